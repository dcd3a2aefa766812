"""The target retries an op that failed for a reason that may pass [L3761-3766]: here an
immutable target file (access denied, event 4112) made writable again while the target
is still retrying; the op is then applied (event 4120), nothing is dropped, and the
Retries counter [L4201] shows it in ``dtake status --json`` and ``dtake stats``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from dtake.testing import ServiceProcess
from tests.integration.pair_support import Factory, replicated_pair, write
from tests.service_support import assert_same, settle, until


def cli_json(svc: ServiceProcess, *args: str) -> Any:
    out = subprocess.run(
        [sys.executable, "-m", "dtake.cli.main", "--socket", svc.socket_path, *args, "--json"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out)


def test_an_immutable_target_file_is_retried_until_writable_again(
    tmp_path: Any, service: Factory
) -> None:
    src = str(tmp_path / "src")
    write(os.path.join(src, "f.txt"), "version 1")
    write(os.path.join(src, "other.txt"), "untouched")
    src, dst, a, b, cid = replicated_pair(tmp_path, service)
    assert b.call("status")["targets"][0]["retries"] == 0
    locked = os.path.join(dst, "f.txt")
    if subprocess.run(["chattr", "+i", locked], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        write(os.path.join(src, "f.txt"), "version 2, written while the copy is immutable")

        def retrying() -> dict[str, Any] | None:
            t: dict[str, Any] = b.call("status")["targets"][0]
            return t if t["retries"] >= 1 else None

        seen = until(retrying, "the target retrying the write")
        assert seen["failures"] == 0
        assert seen["target_status"] == "Retrying"
    finally:
        subprocess.run(["chattr", "-i", locked], check=True)
    # The next retry is applied: nothing dropped, no mirror needed.
    until(lambda: 4120 in [e["id"] for e in b.call("events")], "event 4120")
    st = settle(a, cid)
    assert st["target_data_state"] == "OK"
    assert_same(src, dst)
    t = cli_json(b, "status")["targets"][0]
    assert t["retries"] >= 1 and t["failures"] == 0 and t["target_status"] != "Retrying"
    assert cli_json(b, "stats")["targets"][0]["retries"] == t["retries"]
    assert b.call("dtstat")["TARGET"][0]["Retries"] == t["retries"]
    evs = {e["id"]: e["message"] for e in b.call("events")}
    assert evs[4112].startswith("Target can not write f.txt due to access denied.")
    assert evs[4120].startswith("Target write to f.txt was completed successfully after ")
    assert 4150 not in [e["id"] for e in a.call("events")]
