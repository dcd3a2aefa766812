"""Flush Target [L3387]: discarding a session's target queue (dtake.service.targetqueue)
and the replica control built on it (dtake.service.replica), with scripted sockets."""

from __future__ import annotations

import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dtake.errors import DtakeError
from dtake.protocol.framing import MsgType
from dtake.service.daemon import Store
from dtake.service.events import EventLog
from dtake.service.replica import ReplicaManager
from dtake.service.target import TargetState
from dtake.service.targetqueue import TargetQueues


class Wire:
    """A peer socket: hands out FRAMES, then idles until closed (then EOF)."""

    def __init__(self, frames: list[tuple[Any, Any]]) -> None:
        self.frames = list(frames)
        self.closed = threading.Event()
        self.sent: list[tuple[Any, Any]] = []

    def recv_obj(self, timeout: float | None = None) -> tuple[Any, Any]:
        if self.frames:
            return self.frames.pop(0)
        if self.closed.wait(timeout or 0.05):
            raise EOFError("closed")
        raise TimeoutError

    def send_obj(self, mtype: Any, obj: Any) -> None:
        self.sent.append((mtype, obj))

    def close(self) -> None:
        self.closed.set()


def op(seq: int, data: bytes = b"x" * 100) -> list[Any]:
    return [seq, 1, "f", "", {}, data]


def make_service(tmp_path: Path) -> Any:
    svc = SimpleNamespace(
        node_id="node2",
        store=Store(str(tmp_path)),
        events=EventLog(None),
        cfg=SimpleNamespace(queue=SimpleNamespace(target_memory_max_mb=1), auto_remirror=True),
        features={},
        extra_handlers={},
        connections={},
    )
    svc.target = SimpleNamespace(states={}, observers=[], save=lambda: None)
    return svc


def queued(tmp_path: Path, frames: list[tuple[Any, Any]]) -> tuple[Any, TargetQueues, Any]:
    """A paused target holding FRAMES for one session (state OK)."""
    svc = make_service(tmp_path)
    tqs = TargetQueues(svc)
    svc.features["dtake.service.targetqueue"] = tqs
    tqs.paused = True  # nothing is applied: everything stays queued
    st = TargetState(uuid="u1", target_path="/srv/r", source_node="node1", repset="r", conn_id=4)
    st.data_state = "OK"
    svc.target.states["u1"] = st
    wire = Wire(frames)
    st.session = wire  # the live session (dtake.service.target sets it at open)
    sq = tqs.open(st, wire)
    deadline = threading.Event()
    for _ in range(200):  # the reader takes the frames off the wire
        if sq.ops + len([f for f in sq.frames if f[0] != MsgType.OPS]) >= len(frames):
            break
        deadline.wait(0.01)
    return svc, tqs, sq


def test_discard_drops_the_queue_marks_mirror_required_and_ends_the_session(
    tmp_path: Path,
) -> None:
    frames = [
        (MsgType.OPS, [op(1), op(2)]),
        (MsgType.REQUEST, {"id": -1, "op": "data_state", "state": "OK"}),
        (MsgType.OPS, [op(3)]),
        (MsgType.REQUEST, {"id": 7, "op": "scan"}),
    ]
    svc, tqs, sq = queued(tmp_path, frames)
    assert tqs.figures_for("u1")["ops"] == 3
    res = tqs.discard("u1", reason="target queue discarded by alice")
    assert (res["discarded_ops"], res["conn_id"], res["data_state"]) == (3, 4, "Mirror Required")
    assert res["discarded_bytes"] > 300
    assert tqs.figures_for("u1") == {"ops": 0, "bytes": 0}
    assert not sq.frames  # the request goes too: its answer could not reach the source
    st = svc.target.states["u1"]
    assert st.data_state_reason == "target queue discarded by alice"
    assert 4065 in svc.events.ids()
    assert sq.fs.closed.is_set()
    # The applier gets the end of the session, even while paused.
    with pytest.raises(EOFError):
        sq.recv_obj()


def test_a_source_that_is_gone_leaves_its_queue_visible(tmp_path: Path) -> None:
    _, tqs, sq = queued(tmp_path, [(MsgType.OPS, [op(1)])])
    sq.fs.close()  # EOF: the source node died
    for _ in range(200):
        if sq._error is not None:
            break
        threading.Event().wait(0.01)
    assert sq._error is not None
    assert tqs.figures_for("u1")["ops"] == 1  # the applier still runs: still queued
    assert tqs.show()["queue_ops"] == 1
    sq.state.session = None  # the session ended: leftovers are never applied
    assert tqs.figures_for("u1")["ops"] == 0 and tqs.show()["queue_ops"] == 0


def test_discard_by_connection_id_and_unknown_ones(tmp_path: Path) -> None:
    _, tqs, _ = queued(tmp_path, [(MsgType.OPS, [op(1)])])
    with pytest.raises(DtakeError, match="no single target queue"):
        tqs.discard_cmd(con_id=99)
    with pytest.raises(DtakeError, match="no target queue"):
        tqs.discard("nope")
    assert tqs.discard_cmd(con_id=4)["discarded_ops"] == 1


def test_flush_target_control_from_pending(tmp_path: Path) -> None:
    svc, _, _ = queued(tmp_path, [(MsgType.OPS, [op(1), op(2)])])
    blocker = SimpleNamespace(is_blocked=lambda p: True, block=lambda p: None)
    auto: list[str] = []
    snaps = SimpleNamespace(
        take_auto=lambda st, reason, locked: auto.append(reason), list=lambda d: []
    )
    svc.features["dtake.service.datafeatures"] = SimpleNamespace(snapshots=snaps, blocker=blocker)
    mgr = ReplicaManager(svc)  # type: ignore[arg-type]
    mgr.start("r", "/srv/r")
    rec = mgr.replicas["r"]
    rec.target_uuid, rec.data = "u1", "pending"
    st = mgr.status("r")
    assert st["queued_bytes"] > 0 and st["available"]["flush-target"] == ""
    st = mgr.control("r", "flush-target", user="alice")
    assert (st["control"], st["data"], st["queued_bytes"]) == ("accepted", "suspect", 0)
    assert "discarded by alice (2 ops)" in st["reason"]
    assert 10008 in svc.events.ids()
    assert auto == ["target queue discarded by alice"]  # good -> bad: snapshot first
    assert "empty" in st["available"]["flush-target"]


def test_a_new_source_drops_what_the_previous_one_left_queued(tmp_path: Path) -> None:
    svc, tqs, sq = queued(tmp_path, [(MsgType.OPS, [op(1), op(2)])])
    snaps = SimpleNamespace(take_auto=lambda st, reason, locked: None, list=lambda d: [])
    svc.features["dtake.service.datafeatures"] = SimpleNamespace(snapshots=snaps, blocker=None)
    mgr = ReplicaManager(svc)  # type: ignore[arg-type]
    mgr.start("r", "/srv/r")
    mgr.replicas["r"].target_uuid = "u1"  # the previous source's connection
    new = TargetState(uuid="u2", target_path="/srv/r", source_node="node3", repset="r", conn_id=1)
    mgr.target_opened(new, {"replica": "r", "generation": 5, "source_node": "node3"})
    assert tqs.figures_for("u1")["ops"] == 0 and sq.fs.closed.is_set()
    rec = mgr.replicas["r"]
    assert (rec.target_uuid, rec.source_generation, rec.data) == ("u2", 5, "pending")


def test_frame_cost_counts_op_data_received_as_memoryviews() -> None:
    """Protocol 2 hands the op data over as memoryviews of the frame: they count."""
    from dtake.protocol.framing import MsgType
    from dtake.service.targetqueue import _frame_cost

    data = bytearray(b"x" * 1000)
    ops = [[1, 2, 3, 4, 5, memoryview(data)], [1, 2, 3, 4, 5, b"y" * 10]]
    assert _frame_cost(MsgType.OPS, ops) == (2, 64 + 1000 + 64 + 10)
