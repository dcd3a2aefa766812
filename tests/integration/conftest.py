"""Fixtures: real `dtake serve` processes on loopback, each with its own port and state."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dtake.protocol.auth import generate_key_file
from dtake.testing import ServiceProcess


@pytest.fixture
def keyfile(tmp_path: Any) -> str:
    path = os.path.join(str(tmp_path), "authkey")
    generate_key_file(path)
    return path


@pytest.fixture
def service(tmp_path: Any, keyfile: str) -> Iterator[Callable[..., ServiceProcess]]:
    """Factory: ``service("a")`` starts a service; all are stopped at the end."""
    started: list[ServiceProcess] = []

    def make(
        name: str, *, key: str | None = None, start: bool = True, **extra: Any
    ) -> ServiceProcess:
        sp = ServiceProcess(
            os.path.join(str(tmp_path), f"svc-{name}"), name, key or keyfile, extra=extra
        )
        started.append(sp)
        return sp.start() if start else sp

    yield make
    for sp in started:
        try:
            sp.stop()
        except Exception:
            sp.kill9()


def pytest_runtest_makereport(item: Any, call: Any) -> None:
    # On failure, show the service logs: the first thing an operator would read.
    if call.excinfo is not None and call.when == "call":
        fx = item.funcargs.get("service") if hasattr(item, "funcargs") else None
        if fx is not None:
            for cell in getattr(fx, "__closure__", None) or []:
                val = cell.cell_contents
                if isinstance(val, list):
                    for sp in val:
                        if isinstance(sp, ServiceProcess):
                            item.add_report_section("call", f"dtake serve {sp.name}", sp.tail(60))
