"""A source and a target service with one replicated, settled connection."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from dtake.testing import ServiceProcess
from tests.service_support import assert_same, settle

Factory = Callable[..., ServiceProcess]


def write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


def replicated_pair(
    tmp_path: Any, service: Factory
) -> tuple[str, str, ServiceProcess, ServiceProcess, int]:
    """(src, dst, source service, target service, connection id) once ``src`` (written
    by the caller beforehand) is mirrored to ``dst``."""
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    r = a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst)
    cid = int(r["id"])
    settle(a, cid)
    assert_same(src, dst)
    return src, dst, a, b, cid
