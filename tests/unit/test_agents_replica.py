"""The service side of online pending: availability rules, the control state machine,
generation learned in-band (dtake.service.replica with a scripted service)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from dtake.errors import DtakeError
from dtake.ops import Op, OpKind
from dtake.service.daemon import Store
from dtake.service.events import EventLog
from dtake.service.replica import ReplicaManager, ReplicaRecord, availability, status_text


class Snaps:
    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.reverted: list[str] = []

    def take(self, target: str, *, kind: str = "manual", reason: str = "") -> dict[str, Any]:
        rec = {"id": f"s{len(self.items) + 1}", "target_path": target}
        self.items.append(rec)
        return rec

    def list(self, target: str | None = None) -> list[dict[str, Any]]:
        return list(self.items)

    def revert(self, target: str, snapshot: str) -> dict[str, Any]:
        self.reverted.append(snapshot)
        return {"id": snapshot}


class Blocker:
    def __init__(self) -> None:
        self.paths: set[str] = set()

    def is_blocked(self, p: str) -> bool:
        return p in self.paths

    def block(self, p: str) -> None:
        self.paths.add(p)

    def unblock(self, p: str) -> None:
        self.paths.discard(p)


def make(tmp_path: Path, *, snapshots: bool = True) -> tuple[ReplicaManager, Any]:
    feat = SimpleNamespace(snapshots=Snaps() if snapshots else None, blocker=Blocker())
    svc = SimpleNamespace(
        node_id="node2",
        store=Store(str(tmp_path)),
        events=EventLog(None),
        target=SimpleNamespace(states={}, observers=[]),
        features={"dtake.service.datafeatures": feat},
        extra_handlers={},
        connections={},
    )
    return ReplicaManager(svc), svc  # type: ignore[arg-type]


def test_status_texts_are_the_seeds() -> None:
    assert status_text([("node2", "good"), ("node3", "good")]) == "The status of all targets is OK."
    assert status_text([("node3", "queuing"), ("node2", "pending")]) == (
        "Target node2 is pending. Data integrity not guaranteed. "
        "Target node3 is queuing. Data in queue on target."
    )
    assert "is suspect. Data integrity not guaranteed." in status_text([("n", "suspect")])


def test_availability_rules() -> None:
    rec = ReplicaRecord("r", "/srv/r", data="pending", role="Unpromoted")
    a = availability(rec, snapshots=False, snapshot_exists=False, queued_bytes=-1, current=False)
    assert a["accept"] == "" and a["fail"] == ""
    assert (
        "no snapshot provider" in a["test-data"] and "no snapshot provider" in a["revert-snapshot"]
    )
    assert "only after test-data" in a["reject"]
    assert "no target queue" in a["flush-target"]
    a = availability(rec, snapshots=True, snapshot_exists=True, queued_bytes=10, current=False)
    assert a["test-data"] == a["revert-snapshot"] == a["flush-target"] == ""
    rec.control, rec.test_snapshot = "testing", "s1"
    a = availability(rec, snapshots=True, snapshot_exists=True, queued_bytes=0, current=False)
    assert a["reject"] == "" and "already testing" in a["test-data"]
    assert "empty" in a["flush-target"]
    done = ReplicaRecord("r", "/srv/r", data="good", role="Unpromoted", control="accepted")
    assert (
        "already accepted"
        in availability(done, snapshots=True, snapshot_exists=False, queued_bytes=0, current=True)[
            "accept"
        ]
    )
    active = ReplicaRecord("r", "/srv/r", role="Promoted")
    assert (
        "active"
        in availability(active, snapshots=True, snapshot_exists=True, queued_bytes=0, current=True)[
            "accept"
        ]
    )


def test_generation_is_learned_in_band_and_only_on_mirror_end(tmp_path: Path) -> None:
    mgr, svc = make(tmp_path)
    mgr.start("r", str(tmp_path / "d"))
    assert svc.features["dtake.service.datafeatures"].blocker.paths == {str(tmp_path / "d")}
    st = SimpleNamespace(uuid="u1", target_path=str(tmp_path / "d"), connected=True, last_seq=0)
    svc.target.states["u1"] = st
    mgr.target_opened(st, {"replica": "r", "generation": 7, "source_node": "node1"})  # type: ignore[arg-type]
    s = mgr.status("r")
    assert (s["data"], s["generation"], s["source_generation"]) == ("pending", 0, 7)
    mgr.target_failed(st, Op(OpKind.WRITE, "x"))  # type: ignore[arg-type]
    mgr.target_barrier(st, Op(OpKind.BARRIER, seq=9, tags={"mirror_end": True}))  # type: ignore[arg-type]
    assert mgr.status("r")["data"] == "suspect"  # a dropped op spoils this mirror
    mgr.target_opened(st, {"replica": "r", "generation": 7, "source_node": "node1"})  # type: ignore[arg-type]
    mgr.target_barrier(st, Op(OpKind.BARRIER, seq=12, tags={"mirror_end": True}))  # type: ignore[arg-type]
    s = mgr.status("r")
    assert (s["data"], s["generation"], s["sequence"]) == ("good", 7, 12)
    st.last_seq = 20  # real-time ops applied after the mirror end: the tiebreak position
    s = mgr.status("r")
    assert (s["sequence"], s["position"]) == (20, 8)
    # persisted: a restarted service knows the generation
    mgr2, _ = make(tmp_path)
    assert mgr2.replicas["r"].generation == 7


def test_controls_from_pending(tmp_path: Path) -> None:
    mgr, svc = make(tmp_path)
    mgr.start("r", str(tmp_path / "d"))
    mgr.replicas["r"].data = "pending"
    with pytest.raises(DtakeError, match="only after test-data"):
        mgr.control("r", "reject")
    s = mgr.control("r", "test-data", user="alice")
    assert s["control"] == "testing" and s["test_snapshot"] == "s1"
    s = mgr.control("r", "reject", user="alice")
    assert s["control"] == "" and s["data"] == "pending"
    assert svc.features["dtake.service.datafeatures"].snapshots.reverted == ["s1"]
    s = mgr.control("r", "accept", user="alice")
    assert s["control"] == "accepted"
    s = mgr.control("r", "fail", user="bob")
    assert s["control"] == "failed"
    ids = svc.events.ids()
    assert [i for i in ids if i >= 10000] == [10009, 10012, 10010, 10011, 10013]


def test_controls_without_snapshot_provider_say_so(tmp_path: Path) -> None:
    mgr, _ = make(tmp_path, snapshots=False)
    mgr.start("r", str(tmp_path / "d"))
    mgr.replicas["r"].data = "pending"
    for action in ("test-data", "revert-snapshot"):
        with pytest.raises(DtakeError, match="no snapshot provider"):
            mgr.control("r", action)
    with pytest.raises(DtakeError, match="no target queue"):
        mgr.control("r", "flush-target")


def test_promote_refuses_stale_then_accept_bumps_past_cluster(tmp_path: Path) -> None:
    mgr, svc = make(tmp_path)
    svc.repset_create = lambda *a, **k: {}
    mgr.start("r", str(tmp_path / "d"))
    rec = mgr.replicas["r"]
    rec.generation, rec.data = 3, "good"
    with pytest.raises(DtakeError, match="refusing to promote"):
        mgr.promote("r", [], cluster_generation=5)
    mgr.control("r", "accept")
    s = mgr.promote("r", [], cluster_generation=5)
    assert (s["role"], s["generation"], s["control"]) == ("Promoted", 6, "")
    assert not svc.features["dtake.service.datafeatures"].blocker.paths  # writable now
