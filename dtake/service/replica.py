"""Replicas of a ReplicatedDisk resource (GeoCluster Replicated Disk [L2502-2566]).

One record per resource on every owner node, persisted in ``<state_dir>/replicas.json``:

* **generation + sequence** (as DRBD's generation identifiers): the generation is bumped on
  every promotion; a target learns the source's generation *in-band* (the ``open`` request
  carries it) and adopts it only when a mirror of that generation completes. So freshness
  survives reboots and full-cluster restarts, and a replica that missed a generation is
  never mistaken for a current one;
* **role** (Stopped / Unpromoted / Promoted) and **data** (good / pending / suspect /
  queuing / unknown) with the reason, turned into the seed's status texts [L3399-3408];
* the **operator control** state of online pending [L3386-3392]: testing, accepted,
  failed, with the availability rules of seed-monitoring.md §2.4 and events 10007-10012.

The promoted replica runs GeoCluster's online sequence [L2541-2547]: a replication set
named after the resource, connected to every other owner with the same target path, a
difference mirror with orphans deleted, the others' copies read-only, replication.
Demote/stop run the offline sequence [L2555-2560]. Connections made here are *cluster
managed*: they are not restored when the service restarts (the cluster reconnects them),
so a node that comes back after a crash never pushes its stale data on its own.

Read-only target copies are blocked target paths (dtake.service.blocking): a read-only
bind mount of the directory over itself, while the target writes through a directory fd
opened before the mount.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from dtake.config import DEFAULT_PORT
from dtake.errors import DtakeError, E

if TYPE_CHECKING:
    from dtake.ops import Op
    from dtake.service.daemon import Service
    from dtake.service.source import Connection
    from dtake.service.target import TargetState

__all__ = [
    "ACTIONS",
    "ReplicaManager",
    "ReplicaRecord",
    "availability",
    "install",
    "status_text",
]

log = logging.getLogger("dtake.replica")

STATE_FILE = "replicas.json"
ACTIONS = ("accept", "reject", "flush-target", "revert-snapshot", "test-data", "fail")
DATA_STATES = ("good", "pending", "suspect", "queuing", "unknown")

# Seed events of GeoCluster [L3874-3882] (text as in the seed; %n -> names).
GRD_EVENTS: dict[int, tuple[str, str]] = {
    10000: (
        "error",
        "Connect failed to node {node} for resource {resource}. Adding node to reconnect list.",
    ),
    10001: (
        "info",
        "Reconnect succeeded to node {node} for resource {resource}. Will be added as a possible owner when mirror is complete.",
    ),
    10004: (
        "warning",
        "Failover of the group {resource} is being delayed. Group will be brought online when the target queue is below the limit or the timeout has expired.",
    ),
    10005: (
        "info",
        "Node {node} is taking ownership of the group {resource}. The group will be brought online on this node.",
    ),
    10007: (
        "warning",
        "The user {user} has reverted a snapshot for the {resource} resource on node {node}.",
    ),
    10008: (
        "warning",
        "The user {user} has discarded queued data for the {resource} resource on node {node}.",
    ),
    10009: (
        "warning",
        "The user {user} is verifying data for the {resource} resource on node {node}.",
    ),
    10010: (
        "warning",
        "The user {user} has rejected the data for the {resource} resource on node {node}.",
    ),
    10011: (
        "warning",
        "The user {user} has accepted the data for the {resource} resource on node {node}.",
    ),
    10012: (
        "warning",
        "The GeoCluster Replicated Disk resource {resource} has been set to validate its data. No data replication is occurring to the remaining nodes in the cluster.",
    ),
    # DESIGN (no seed id for Fail Resource, seed-monitoring.md §2.4): logged all the same.
    10013: (
        "warning",
        "The user {user} has failed the {resource} resource on node {node}. No connection will be established.",
    ),
}


@dataclass
class ReplicaRecord:
    resource: str
    directory: str
    generation: int = 0
    sequence: int = 0
    role: str = "Stopped"  # Stopped | Unpromoted | Promoted
    data: str = "unknown"  # good | pending | suspect | queuing | unknown (never had data)
    reason: str = "no data received yet"
    control: str = ""  # "" | testing | accepted | failed
    history: list[int] = field(default_factory=list)
    source_node: str = ""
    source_generation: int = 0
    target_uuid: str = ""
    failures_since_mirror: int = 0
    test_snapshot: str = ""
    conn_uuids: list[str] = field(default_factory=list)
    changed: float = 0.0

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicaRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in d.items() if k in known})


# ---------------------------------------------------------------------------- pure rules
def target_sentence(node: str, state: str) -> str:
    """The seed's status description for one target [L3399-3408]."""
    if state == "pending" or state == "unknown":
        return f"Target {node} is pending. Data integrity not guaranteed."
    if state == "suspect":
        return f"Target {node} is suspect. Data integrity not guaranteed."
    if state == "queuing":
        return f"Target {node} is queuing. Data in queue on target."
    return f"Target {node} is OK."


def status_text(targets: list[tuple[str, str]]) -> str:
    """Aggregate (DESIGN, seed-monitoring.md §2.5): the OK sentence or one per bad target."""
    bad = [(n, s) for n, s in targets if s != "good"]
    if not bad:
        return "The status of all targets is OK."
    return " ".join(target_sentence(n, s) for n, s in sorted(bad))


def availability(
    rec: ReplicaRecord,
    *,
    snapshots: bool,
    snapshot_exists: bool,
    queued_bytes: int,
    current: bool,
) -> dict[str, str]:
    """Action -> "" when available, else why not (seed-monitoring.md §2.4 DESIGN rules).

    ``current``: the replica's data is good as far as this node knows (a newer generation
    elsewhere is known to the agent only, so Accept stays offered). Accept needs no snapshot (the seed's "use the current data"); Reject only
    follows Test Data; Test Data and Revert need a snapshot provider; Flush Target needs
    data in the target queue; Fail is always offered.
    """
    out: dict[str, str] = {}
    promoted = rec.role == "Promoted"
    if promoted:
        out["accept"] = "the replica is the active (promoted) copy"
    elif rec.control == "accepted":
        out["accept"] = "already accepted: pacemaker promotes this copy"
    else:
        out["accept"] = ""
    if rec.control != "testing" or not rec.test_snapshot:
        out["reject"] = "only after test-data (there is no test snapshot to revert to)"
    else:
        out["reject"] = "" if snapshots else "not available: no snapshot provider"
    if not snapshots:
        out["test-data"] = "not available: no snapshot provider"
    elif promoted:
        out["test-data"] = "the replica is the active (promoted) copy"
    elif rec.control == "testing":
        out["test-data"] = "already testing: accept or reject"
    else:
        out["test-data"] = ""
    if not snapshots:
        out["revert-snapshot"] = "not available: no snapshot provider"
    elif not snapshot_exists:
        out["revert-snapshot"] = "no snapshot of this replica exists"
    elif promoted:
        out["revert-snapshot"] = "the replica is the active (promoted) copy"
    else:
        out["revert-snapshot"] = ""
    if queued_bytes < 0:
        out["flush-target"] = "not available: no target queue provider"
    elif queued_bytes == 0:
        out["flush-target"] = "the target queue is empty"
    else:
        out["flush-target"] = ""
    out["fail"] = ""
    return out


def _data_from_source_state(state: str) -> str:
    """Source-side target data state [L2942-2947] -> GRD data state."""
    if state == "OK":
        return "good"
    if state in ("Mirroring", "Mirror Required"):
        return "pending"
    return "suspect"


# ---------------------------------------------------------------------------- manager
class ReplicaManager:
    def __init__(self, svc: Service) -> None:
        self.svc = svc
        self._lock = threading.RLock()
        raw = svc.store.load(STATE_FILE, {"replicas": {}, "managed": []})
        self.replicas: dict[str, ReplicaRecord] = {
            k: ReplicaRecord.from_dict(v) for k, v in raw.get("replicas", {}).items()
        }
        self.managed: set[str] = set(raw.get("managed", []))

    # -------------------------------------------------------------- persistence
    def save(self) -> None:
        with self._lock:
            doc = {
                "replicas": {k: asdict(v) for k, v in self.replicas.items()},
                "managed": sorted(self.managed),
            }
        self.svc.store.save(STATE_FILE, doc)

    def drop_managed_connections(self) -> None:
        """Called before the service restores its connections: cluster-managed ones stay
        down until the cluster brings them up ("Automatically Reconnect During Source
        Initialization" off for cluster connections [L2461])."""
        conns = self.svc.store.load("connections.json", [])
        keep = [c for c in conns if c.get("uuid") not in self.managed]
        if len(keep) != len(conns):
            log.info("not restoring %d cluster-managed connection(s)", len(conns) - len(keep))
            self.svc.store.save("connections.json", keep)
        dropped = {c.get("repset") for c in conns if c.get("uuid") in self.managed}
        with self._lock:
            for rec in self.replicas.values():
                if rec.role == "Promoted":
                    # The node (or service) went down while active: pacemaker decides
                    # again; until then this copy is a stopped one.
                    rec.role = "Stopped"
                    rec.conn_uuids = []
            self.managed = {u for u in self.managed if u in {c.get("uuid") for c in keep}}
        if dropped:
            self.save()

    def _get(self, resource: str) -> ReplicaRecord:
        rec = self.replicas.get(resource)
        if rec is None:
            raise DtakeError(E.NO_REPSET, f"no replica of resource {resource!r} on this node")
        return rec

    def _touch(self, rec: ReplicaRecord) -> None:
        rec.changed = time.time()

    # -------------------------------------------------------------- read-only copies
    def _is_mounted(self, path: str) -> bool:
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as fh:
                return any(line.split()[4] == path for line in fh)
        except OSError:
            return False

    def block(self, directory: str) -> None:
        """Make DIRECTORY read-only to everyone but the service [L2545]: a blocked target
        path of dtake.service.blocking (read-only bind mount; the target writes through a
        directory fd taken before it)."""
        d = os.path.normpath(directory)
        os.makedirs(d, exist_ok=True)
        blocker = self._feature("blocker")
        if blocker is None:
            log.warning("replica copy %s not blocked: no blocking provider installed", d)
            return
        if not blocker.is_blocked(d):
            blocker.block(d)

    def unblock(self, directory: str) -> None:
        d = os.path.normpath(directory)
        blocker = self._feature("blocker")
        if blocker is not None and blocker.is_blocked(d):
            blocker.unblock(d)

    def _is_blocked(self, directory: str) -> bool:
        blocker = self._feature("blocker")
        d = os.path.normpath(directory)
        return bool(blocker.is_blocked(d)) if blocker is not None else False

    # -------------------------------------------------------------- in-band hooks
    def open_fields(self, conn: Connection) -> dict[str, Any]:
        """Source side: what the ``open`` request carries for a replica's connection."""
        rec = self.replicas.get(conn.rec.repset)
        # By set name (GeoCluster names the set after the resource [L2541]): the uuid is
        # recorded only after connect() returns, and the first open may come before.
        if rec is None or rec.role != "Promoted":
            return {}
        return {
            "replica": rec.resource,
            "generation": rec.generation,
            "data_state": conn.rec.target_data_state,
        }

    def target_opened(self, st: TargetState, req: dict[str, Any]) -> None:
        name = req.get("replica")
        if not name:
            return
        gen = int(req.get("generation", 0))
        with self._lock:
            rec = self.replicas.get(str(name))
            if rec is None:
                rec = ReplicaRecord(resource=str(name), directory=st.target_path)
                self.replicas[rec.resource] = rec
            previous = rec.target_uuid if rec.target_uuid != st.uuid else ""
            rec.source_node = str(req.get("source_node", ""))
            rec.source_generation = gen
            rec.target_uuid = st.uuid
            if gen != rec.generation or req.get("data_state") != "OK" or rec.data != "good":
                self._set_data(
                    rec,
                    "pending",
                    f"mirror from {rec.source_node} (generation {gen}) not complete",
                )
                rec.failures_since_mirror = 0
            self._touch(rec)
        self.save()
        if previous:
            self._drop_previous_queue(rec, previous)

    def _drop_previous_queue(self, rec: ReplicaRecord, uuid: str) -> None:
        """Another source took over this copy (a new promotion): what the previous one
        left in the target queue (target paused, that source gone) is older than the
        mirror that follows and must never be applied after it. Called without
        self._lock (the old applier holds its copy's lock while it calls our hooks)."""
        tqs = self._target_queue()
        figures = getattr(tqs, "figures_for", None)
        if figures is None or not int((figures(uuid) or {}).get("ops", 0)):
            return
        with contextlib.suppress(DtakeError):
            res = tqs.discard(uuid, reason=f"superseded by the source {rec.source_node}")
            log.warning(
                "replica %s: %d queued ops of the previous source dropped (new source %s)",
                rec.resource,
                res.get("discarded_ops", 0),
                rec.source_node,
            )

    def _rec_for_target(self, st: TargetState) -> ReplicaRecord | None:
        for rec in self.replicas.values():
            if rec.target_uuid == st.uuid:
                return rec
        return None

    def target_barrier(self, st: TargetState, op: Op) -> None:
        with self._lock:
            rec = self._rec_for_target(st)
            if rec is None:
                return
            if op.tags.get("mirror_end"):
                if rec.failures_since_mirror:
                    return  # the source sees the failures and mirrors again
                if rec.generation != rec.source_generation and rec.generation:
                    rec.history = [*rec.history, rec.generation][-4:]
                rec.generation = rec.source_generation
                rec.sequence = op.seq
                self._set_data(rec, "good", "")
                if rec.control in ("accepted", "failed"):
                    rec.control = ""  # resolved: this copy is current again
            elif op.tags.get("data_state") and op.tags["data_state"] != "OK":
                rec.failures_since_mirror = 0
                self._set_data(
                    rec,
                    _data_from_source_state(str(op.tags["data_state"])),
                    str(op.tags["data_state"]),
                )
            else:
                return
            self._touch(rec)
        self.save()

    def target_failed(self, st: TargetState, op: Op) -> None:
        with self._lock:
            rec = self._rec_for_target(st)
            if rec is None:
                return
            rec.failures_since_mirror += 1
            self._set_data(rec, "suspect", f"an operation was dropped on the target ({op.path})")
        self.save()

    def _set_data(self, rec: ReplicaRecord, data: str, reason: str) -> None:
        if rec.data != data or rec.reason != reason:
            log.info("replica %s: data %s -> %s %s", rec.resource, rec.data, data, reason)
        rec.data, rec.reason = data, reason

    # -------------------------------------------------------------- providers
    # Snapshots and path blocking come from the data features module when it is
    # installed (dtake.service.datafeatures: .snapshots, .blocker); without it the three
    # snapshot/queue controls say "not available" (the seed hides them [L3380]).
    def _feature(self, attr: str) -> Any:
        return getattr(self.svc.features.get("dtake.service.datafeatures"), attr, None)

    def _handler(self, *names: str) -> Any:
        for n in names:
            fn = self.svc.extra_handlers.get(n)
            if fn is not None:
                return fn
        return None

    def _snapshots(self) -> Any:
        return self._feature("snapshots")

    def _snapshot_list(self, rec: ReplicaRecord) -> list[dict[str, Any]]:
        snaps = self._snapshots()
        if snaps is None:
            return []
        try:
            items = snaps.list(rec.directory)
        except DtakeError:
            return []
        return [s for s in items or [] if isinstance(s, dict)]

    def _target_queue(self) -> Any:
        return self.svc.features.get("dtake.service.targetqueue")

    def _queued_bytes(self, rec: ReplicaRecord) -> int:
        """Bytes in this replica's target queue; -1 when no target queue exists."""
        tqs = self._target_queue()
        if tqs is None or not hasattr(tqs, "figures_for"):
            return -1
        if not rec.target_uuid:
            return 0
        return int((tqs.figures_for(rec.target_uuid) or {}).get("bytes", 0))

    def _flush_target_queue(self, rec: ReplicaRecord, user: str) -> dict[str, Any]:
        """Flush Target [L3387]: the target queue drops what it holds; the copy's data
        state becomes Mirror Required (dtake.service.targetqueue). Never called with
        self._lock held: the applier holds the copy's lock while it calls our hooks."""
        tqs = self._target_queue()
        fn = getattr(tqs, "discard", None)
        if fn is None:
            raise DtakeError(E.NOT_SUPPORTED, "not available: the target queue cannot be flushed")
        res: dict[str, Any] = fn(rec.target_uuid, reason=f"target queue discarded by {user}")
        return res

    # -------------------------------------------------------------- status
    def _target_connected(self, rec: ReplicaRecord) -> bool:
        st = self.svc.target.states.get(rec.target_uuid) if rec.target_uuid else None
        return bool(st is not None and st.connected)

    def _own_state(self, rec: ReplicaRecord) -> tuple[str, str]:
        """(data, reason) of this copy: our record, corrected by the target's own data
        state (dtake.service.datastate: the source tells it in-band when it goes bad)."""
        data, reason = rec.data, rec.reason
        st = self.svc.target.states.get(rec.target_uuid) if rec.target_uuid else None
        ds = getattr(st, "data_state", "OK") if st is not None else "OK"
        if data == "good" and ds != "OK":
            data = _data_from_source_state(ds)
            reason = getattr(st, "data_state_reason", "") or ds
        if data == "good" and self._queued_bytes(rec) > 0:
            data, reason = "queuing", "data in queue on the target"
        return data, reason

    def status(self, resource: str) -> dict[str, Any]:
        with self._lock:
            rec = self._get(resource)
            node = self.svc.node_id
            targets: list[dict[str, Any]] = []
            if rec.role == "Promoted":
                for c in list(self.svc.connections.values()):
                    if c.rec.uuid not in rec.conn_uuids:
                        continue
                    cs = c.status()
                    if cs["state"] != "Started" or not cs["connected_since"]:
                        state = "pending"
                    else:
                        state = _data_from_source_state(cs["target_data_state"])
                    targets.append(
                        {
                            "node": c.peer_node or c.rec.host,
                            "host": c.rec.host,
                            "connection": c.rec.id,
                            "state": state,
                            "transmit": cs["state"],
                            "mirror": cs["mirror_status"],
                            "target_data_state": cs["target_data_state"],
                            "queued_items": cs["queued_items"],
                            "last_error": cs["last_error"],
                        }
                    )
                own, reason = "good", rec.reason
                text = status_text([(t["node"], t["state"]) for t in targets])
            else:
                own, reason = self._own_state(rec)
                text = status_text([(node, own)]) if own == "good" else target_sentence(node, own)
            snaps = self._snapshots() is not None
            snap_list = self._snapshot_list(rec) if snaps else []
            queued = self._queued_bytes(rec)
            st = self.svc.target.states.get(rec.target_uuid) if rec.target_uuid else None
            seq = rec.sequence
            position = 0  # ops applied since this generation's mirror completed
            if st is not None and rec.data == "good" and rec.source_generation == rec.generation:
                seq = max(seq, st.last_seq)
                position = max(0, st.last_seq - rec.sequence)
            return {
                "resource": rec.resource,
                "node": node,
                "directory": rec.directory,
                "role": rec.role,
                "generation": rec.generation,
                "sequence": seq,
                "position": position,
                "history": list(rec.history),
                "data": own,
                "reason": reason,
                "control": rec.control,
                "status_text": text,
                "source_node": rec.source_node,
                "source_generation": rec.source_generation,
                "source_connected": self._target_connected(rec),
                "targets": targets,
                "queued_bytes": max(queued, 0),
                "snapshots": len(snap_list),
                "test_snapshot": rec.test_snapshot,
                "blocked": self._is_blocked(rec.directory),
                "target_data_state": getattr(st, "data_state", "") if st is not None else "",
                "available": availability(
                    rec,
                    snapshots=snaps,
                    snapshot_exists=bool(snap_list),
                    queued_bytes=queued,
                    current=own == "good" and rec.source_generation <= rec.generation,
                ),
            }

    def list_all(self) -> list[dict[str, Any]]:
        return [self.status(n) for n in sorted(self.replicas)]

    # -------------------------------------------------------------- lifecycle
    def start(self, resource: str, directory: str) -> dict[str, Any]:
        """Unpromoted instance: a read-only target copy, ready to receive."""
        d = os.path.normpath(directory)
        if not d.startswith("/") or d == "/":
            raise DtakeError(E.INVALID_PARAMETER, f"directory must be absolute: {directory!r}")
        with self._lock:
            rec = self.replicas.get(resource)
            if rec is None:
                rec = ReplicaRecord(resource=resource, directory=d)
                self.replicas[resource] = rec
            if rec.role == "Promoted":
                return self.status(resource)  # idempotent: start never demotes
            rec.directory = d
            rec.role = "Unpromoted"
            self._touch(rec)
        self.save()
        self.block(d)
        return self.status(resource)

    def promote(
        self,
        resource: str,
        peers: list[dict[str, Any]],
        *,
        cluster_generation: int = 0,
        force: bool = False,
        mirror: str = "differences",
        orphans: str = "delete",
        compression: str = "none",
        compression_level: int | None = None,
    ) -> dict[str, Any]:
        """GeoCluster's online sequence [L2541-2547]; refuses stale or incomplete data."""
        with self._lock:
            rec = self._get(resource)
            if rec.role != "Promoted":
                fresh = rec.generation == 0 and cluster_generation == 0
                current = rec.data == "good" and rec.generation >= cluster_generation
                if rec.control == "failed":
                    raise DtakeError(
                        E.NOT_SUPPORTED,
                        f"replica {resource} was failed by the operator: run `dtake grd accept {resource}` to use it",
                    )
                if not (fresh or current or rec.control == "accepted" or force):
                    raise DtakeError(
                        E.NOT_SUPPORTED,
                        f"refusing to promote {resource}: data {rec.data} generation "
                        f"{rec.generation} (newest known {cluster_generation}); online pending: "
                        f"`dtake grd status {resource}`",
                    )
                if rec.generation:
                    rec.history = [*rec.history, rec.generation][-4:]
                rec.generation = max(rec.generation, cluster_generation) + 1
                rec.sequence = 0
                rec.role = "Promoted"
                rec.data = "good"
                rec.reason = ""
                rec.control = ""
                rec.test_snapshot = ""
                rec.source_node = ""
                rec.source_generation = 0
                self._touch(rec)
                self.save()  # write-ahead: the new generation is on disk before any data moves
                self.svc.events.emit(10005, node=self.svc.node_id, resource=resource)
            d = rec.directory
        # (4) for this node: its own copy becomes the writable source copy
        self.unblock(d)
        # (1) replication set named after the resource
        self.svc.repset_create(resource, [f"{d} inc, rec"], replace=True)
        existing = {
            (c.rec.host, c.rec.port): c
            for c in list(self.svc.connections.values())
            if c.rec.repset == resource
        }
        uuids: list[str] = []
        for p in peers:
            host, port = str(p["host"]), int(p.get("port", DEFAULT_PORT))
            c = existing.pop((host, port), None)
            if c is None:
                # (2)+(3) connect every other owner; difference mirror, orphans deleted
                st = self.svc.connect(
                    resource,
                    host,
                    port,
                    d,
                    mirror=mirror,
                    orphans=orphans,
                    compression=compression,
                    compression_level=compression_level,
                )
                uuid = str(st["uuid"])
            else:
                uuid = c.rec.uuid
            uuids.append(uuid)
        for c in existing.values():  # owners no longer listed
            self.svc.disconnect(c.rec.id)
        with self._lock:
            rec.conn_uuids = uuids
            self.managed |= set(uuids)
        self.save()
        # (5) real-time replication runs on every connection from now on
        return self.status(resource)

    def demote(self, resource: str, *, drain_s: float = 0.0) -> dict[str, Any]:
        """Offline sequence [L2555-2560] on the active node, then a read-only target copy.

        The copy is made read-only first, so nothing is written here once pacemaker decided
        to demote (e.g. this partition lost quorum: no-quorum-policy=stop demotes, then
        stops). DRAIN_S: then wait up to this long for the connections to send what is
        queued, so every write made before the demote reaches the owners (bounded by the
        op timeout; an owner that cannot be reached only costs this wait).

        The connections are stopped before they are removed, so no ``close`` request goes
        to the owners: it would wait for an answer from an owner that may be unreachable
        (a partition: up to the request timeout, far beyond the demote timeout), and the
        owner would unblock its copy, which stays a read-only target copy.
        """
        with self._lock:
            rec = self._get(resource)
            conns = [c for c in self.svc.connections.values() if c.rec.uuid in rec.conn_uuids]
        self.block(rec.directory)  # stop writing here first; the service still reads
        deadline = time.monotonic() + max(0.0, drain_s)
        for c in conns:  # (1) stop replication once what is queued got out
            left = deadline - time.monotonic()
            if left > 0 and c.transmit_state() == "Started":
                c.wait_idle(left)
        for c in conns:  # (3) disconnect from all owners
            c.stop()
            with contextlib.suppress(DtakeError):
                self.svc.disconnect(c.rec.id)
        with contextlib.suppress(DtakeError):  # (4) delete the replication set
            self.svc.repset_delete(resource)
        with self._lock:
            self.managed -= set(rec.conn_uuids)
            rec.conn_uuids = []
            if rec.role == "Promoted":
                rec.role = "Unpromoted"
            self._touch(rec)
        self.save()
        return self.status(resource)

    def stop(self, resource: str, *, drain_s: float = 0.0) -> dict[str, Any]:
        with self._lock:
            rec = self.replicas.get(resource)
        if rec is None:
            return {"resource": resource, "role": "Stopped"}
        if rec.role == "Promoted" or rec.conn_uuids:
            self.demote(resource, drain_s=drain_s)
        self.unblock(rec.directory)  # (2) the read-only limitation is removed
        with self._lock:
            rec.role = "Stopped"
            self._touch(rec)
        self.save()
        return self.status(resource)

    # -------------------------------------------------------------- operator controls
    def control(
        self, resource: str, action: str, user: str = "root", snapshot: str = ""
    ) -> dict[str, Any]:
        """One of the seed's six controls [L3386-3392] on this node's replica.

        SNAPSHOT: for revert-snapshot, the snapshot to revert to (default: the latest)."""
        if action not in ACTIONS:
            raise DtakeError(E.INVALID_OPTION, f"action must be one of {', '.join(ACTIONS)}")
        st = self.status(resource)
        why = st["available"][action]
        if why:
            raise DtakeError(
                E.NOT_SUPPORTED,
                f"{action} is not available for {resource} on {self.svc.node_id}: {why}",
                {"available": st["available"]},
            )
        node = self.svc.node_id
        ev = {"resource": resource, "node": node, "user": user}
        flushed: dict[str, Any] = {}
        if action == "flush-target":
            flushed = self._flush_target_queue(self._get(resource), user)
        with self._lock:
            rec = self._get(resource)
            if action == "accept":
                rec.control = "accepted"
                rec.reason = f"data accepted by {user}"
                self.svc.events.emit(10011, **ev)
            elif action == "fail":
                rec.control = "failed"
                rec.reason = f"failed by {user}: no connection will be established"
                self.svc.events.emit(10013, **ev)
            elif action == "test-data":
                snap = self._snapshots().take(
                    rec.directory, kind="manual", reason=f"test data ({resource})"
                )
                rec.test_snapshot = str((snap or {}).get("id", ""))
                rec.control = "testing"
                rec.reason = f"testing data (snapshot {rec.test_snapshot})"
                self.svc.events.emit(10009, **ev)
                self.svc.events.emit(10012, **ev)
            elif action == "reject":
                self._snapshots().revert(rec.directory, rec.test_snapshot)
                rec.control = ""
                rec.test_snapshot = ""
                self._set_data(rec, "pending", f"data rejected by {user}")
                self.svc.events.emit(10010, **ev)
            elif action == "revert-snapshot":
                ids = [str(x.get("id")) for x in self._snapshot_list(rec)]
                snap = snapshot or ids[-1]
                if snap not in ids:
                    raise DtakeError(
                        E.INVALID_PARAMETER,
                        f"no snapshot {snap!r} of {rec.directory}: {', '.join(ids)}",
                    )
                # By the copy's connection, so the data state recorded is this copy's:
                # Snapshot Reverted [L2947], written before the data changes.
                copy = rec.target_uuid if rec.target_uuid in self.svc.target.states else ""
                self._snapshots().revert(copy or rec.directory, snap)
                self._set_data(rec, "suspect", f"Snapshot Reverted: snapshot {snap} by {user}")
                rec.control = "accepted"
                self.svc.events.emit(10007, **ev)
            elif action == "flush-target":
                # Its data lacks what was queued: the operator takes it as it is, and
                # it is replicated "without the data that was in queue" [L3387].
                self._set_data(
                    rec,
                    "suspect",
                    f"target queue discarded by {user} ({flushed.get('discarded_ops', 0)} ops)",
                )
                rec.control = "accepted"
                self.svc.events.emit(10008, **ev)
            self._touch(rec)
        self.save()
        return self.status(resource)

    def manage(self, con_id: int) -> dict[str, Any]:
        """Mark a connection cluster-managed (SourceConnection): not restored at service start."""
        c = self.svc.connections.get(int(con_id))
        if c is None:
            raise DtakeError(E.NO_CONNECTION, f"Connection does not exist: {con_id}")
        with self._lock:
            self.managed.add(c.rec.uuid)
        self.save()
        return {"id": c.rec.id, "uuid": c.rec.uuid, "managed": True}

    def forget(self, resource: str) -> dict[str, Any]:
        with self._lock:
            rec = self.replicas.get(resource)
            if rec is not None and rec.role != "Stopped":
                raise DtakeError(
                    E.REPSET_IN_USE, f"replica {resource} is {rec.role}: stop it first"
                )
            self.replicas.pop(resource, None)
        self.save()
        return {"resource": resource, "forgotten": True}


def install(svc: Service) -> ReplicaManager:
    from dtake.service.events import EVENTS

    for k, v in GRD_EVENTS.items():
        EVENTS.setdefault(k, v)
    mgr = ReplicaManager(svc)
    mgr.drop_managed_connections()
    # The blocked paths of started replicas persist with the blocking feature
    # (blocked.json), so a restarted service re-blocks them itself.
    svc.target.observers.append(mgr)
    svc.register("replica_status", mgr.status, read_only=True)
    svc.register("replica_list", mgr.list_all, read_only=True)
    svc.register("replica_start", mgr.start)
    svc.register("replica_promote", mgr.promote)
    svc.register("replica_demote", mgr.demote)
    svc.register("replica_stop", mgr.stop)
    svc.register("replica_control", mgr.control)
    svc.register("replica_forget", mgr.forget)
    svc.register("replica_manage", mgr.manage)
    return mgr
