"""A disconnect does not hang on a target that never answers (a partition, a frozen
peer): the `close` request is bounded, the connection goes away, and the source can
connect again and resync the target byte for byte afterwards."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from typing import Any

from dtake.testing import ServiceProcess
from tests.service_support import assert_same

Factory = Callable[..., ServiceProcess]


def _tree(root: str, n: int) -> None:
    os.makedirs(root, exist_ok=True)
    for i in range(n):
        with open(os.path.join(root, f"f{i}"), "w") as fh:
            fh.write(f"file {i}\n" * (i + 1))


def test_disconnect_from_a_frozen_target_returns(tmp_path: Any, service: Factory) -> None:
    src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
    _tree(src, 20)
    a, b = service("a"), service("b")
    a.call("repset_create", name="rs", rules=[f"{src} inc, rec"])
    cid = int(a.call("connect", repset="rs", host="127.0.0.1", port=b.port, target_path=dst)["id"])
    a.call("wait", con_id=cid, timeout_s=60)
    assert b.proc is not None
    os.kill(b.proc.pid, signal.SIGSTOP)  # the target hears nothing and answers nothing
    try:
        with a.client() as c:
            # Unbounded, the close request waited 300 s for its answer: far past this.
            c.call("disconnect", con_id=cid, timeout=60)
        assert a.call("status")["connections"] == []
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    # Nothing lost: changes made meanwhile reach the target after a new connection.
    with open(os.path.join(src, "later"), "w") as fh:
        fh.write("written while disconnected\n")
    time.sleep(0.2)
    cid = a.connect_to(b, "rs", dst, mirror="differences")
    a.call("wait", con_id=cid, timeout_s=120)
    assert_same(src, dst)
