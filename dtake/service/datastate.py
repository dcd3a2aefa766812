"""Target data state: the seed's good/bad table as one transition function [L5602-5625].

Values [L2942-2947]: OK, Mirroring, Mirror Required, Restore Required, Snapshot Reverted.
Good = {OK}; every other value is bad (seed-monitoring.md §1.3.1 DESIGN).

``transition(current, event)`` is the whole table: it returns the next state, whether an
automatic snapshot must be taken *before* the new state is recorded (good -> bad
[L5627-5631]), and the reason logged with event 4065. Both sides use it:

* the source (``Connection.set_data_state`` is write-ahead: the new value is on disk
  before the data changes) calls :func:`source_event` at every transition and tells the
  target in-band (:func:`notify_target`), so the target's snapshot is taken between the
  last op of the good state and the first op of the bad one;
* the target keeps its own value per connection (targets.json), because after a failover
  the ReplicatedDisk agent asks the *target's* service whether its copy is good.

Restore Required and Snapshot Reverted hold replication and automatic mirrors until a
restore completes or a user mirror overrides them (4018, [L5618-5621]).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtake.service.daemon import Service
    from dtake.service.source import Connection
    from dtake.service.target import TargetState

__all__ = [
    "BAD",
    "GOOD",
    "HOLD",
    "MIRRORING",
    "MIRROR_REQUIRED",
    "OK",
    "RESTORE_REQUIRED",
    "SNAPSHOT_REVERTED",
    "STATES",
    "DataEvent",
    "Transition",
    "is_good",
    "notify_target",
    "on_open_response",
    "scheduled_allowed",
    "source_event",
    "target_event",
    "target_open",
    "transition",
]

log = logging.getLogger("dtake.datastate")

OK = "OK"
MIRRORING = "Mirroring"
MIRROR_REQUIRED = "Mirror Required"
RESTORE_REQUIRED = "Restore Required"
SNAPSHOT_REVERTED = "Snapshot Reverted"
STATES = (OK, MIRRORING, MIRROR_REQUIRED, RESTORE_REQUIRED, SNAPSHOT_REVERTED)
GOOD = frozenset({OK})
BAD = frozenset(STATES) - GOOD
# States that hold replication and automatic mirrors until a restore or a user mirror.
HOLD = frozenset({RESTORE_REQUIRED, SNAPSHOT_REVERTED})


class DataEvent(enum.Enum):
    """The rows of the seed's table [L5602-5625] plus the gaps of DESIGN §2."""

    MIRROR_STARTED = "Mirror Started"
    MIRROR_OVERRIDE = "Mirror Started by the user"  # overrides Restore Required
    MIRROR_STOPPED = "Mirror Stopped"
    MIRROR_COMPLETE = "Mirror Complete"
    WRITE_RETRIED = "Write Operation Retried"
    WRITE_DROPPED = "Write Operation Dropped"
    WRITE_SUCCEEDED = "Write Operation Succeeded"
    RESTARTED_WITH_PERSISTENCE = "Target Restarted with Connection Persistence"
    RESTARTED_WITHOUT_PERSISTENCE = "Target Restarted without Connection Persistence"
    OPS_LOST = "Operations Lost"  # queue exhausted, capture overflow (DESIGN §2)
    RESTORE_REQUIRED = "Restore Required"
    SNAPSHOT_REVERTED = "Snapshot Reverted"
    RESTORE_COMPLETE = "Restore Complete"


@dataclass(frozen=True)
class Transition:
    old: str
    new: str
    snapshot_before: bool  # take the automatic snapshot before recording ``new``
    reason: str
    held: bool = False  # the event was ignored because Restore Required/Snapshot Reverted

    @property
    def changed(self) -> bool:
        return self.old != self.new


def is_good(state: str) -> bool:
    return state in GOOD


def scheduled_allowed(state: str) -> bool:
    """Scheduled and automatic snapshots only in a good state [L5632]; manual always."""
    return is_good(state)


def _label(ev: DataEvent) -> str:
    return str(ev.value)


def transition(current: str, ev: DataEvent, *, auto_remirror: bool = True) -> Transition:
    """The seed's table [L5602-5625]; ``current`` is the recorded state."""
    reason = _label(ev)
    if current not in STATES:
        current = MIRROR_REQUIRED  # unknown text on disk: never assume good
    new = current
    snap = False
    held = False
    if ev is DataEvent.MIRROR_OVERRIDE:
        new = MIRRORING
    elif current in HOLD and ev not in (
        DataEvent.RESTORE_COMPLETE,
        DataEvent.RESTORE_REQUIRED,
        DataEvent.SNAPSHOT_REVERTED,
    ):
        # [L5618-5621]: only a restore or a (user) mirror leaves these states.
        held = ev is not DataEvent.WRITE_RETRIED and ev is not DataEvent.WRITE_SUCCEEDED
    elif ev is DataEvent.MIRROR_STARTED:
        new = MIRRORING
    elif ev is DataEvent.MIRROR_STOPPED:
        new = MIRROR_REQUIRED if current == MIRRORING else current
    elif ev is DataEvent.MIRROR_COMPLETE:
        # Only a mirror that ran from start to end without a dropped write makes the
        # copy good: a drop during it left Mirror Required ("mirror first" [L5610]),
        # and that mirror's end must not hide it.
        new = OK if current == MIRRORING else current
    elif ev in (DataEvent.WRITE_RETRIED, DataEvent.WRITE_SUCCEEDED):
        pass  # good stays good; the op being retried is not in a snapshot [L5609]
    elif ev in (DataEvent.WRITE_DROPPED, DataEvent.OPS_LOST):
        new = MIRROR_REQUIRED
    elif ev is DataEvent.RESTARTED_WITH_PERSISTENCE:
        pass
    elif ev is DataEvent.RESTARTED_WITHOUT_PERSISTENCE:
        new = MIRROR_REQUIRED
    elif ev is DataEvent.RESTORE_REQUIRED:
        new = RESTORE_REQUIRED
    elif ev is DataEvent.SNAPSHOT_REVERTED:
        new = SNAPSHOT_REVERTED
    elif ev is DataEvent.RESTORE_COMPLETE:
        new = OK
    if is_good(current) and not is_good(new):
        if ev is DataEvent.RESTARTED_WITHOUT_PERSISTENCE:
            # [L5614]: only when the data was good and auto-remirror is on.
            snap = auto_remirror
        elif ev is not DataEvent.SNAPSHOT_REVERTED:
            snap = True  # a revert replaces the data: nothing good left to keep
    return Transition(current, new, snap, reason, held)


# ---------------------------------------------------------------------------- source side
def source_event(conn: Connection, ev: DataEvent, detail: str = "") -> Transition:
    """Apply ``ev`` to a source connection's recorded state (write-ahead)."""
    tr = transition(conn.rec.target_data_state, ev, auto_remirror=bool(conn.svc.cfg.auto_remirror))
    if tr.held:
        log.info(
            "connection %d: %s ignored: target data state is %s", conn.rec.id, tr.reason, tr.old
        )
        return tr
    if tr.changed:
        conn.data_state_reason = f"{tr.reason}: {detail}" if detail else tr.reason
        conn.data_state_snapshot = tr.snapshot_before
        # A user mirror or a completed restore leaves Restore Required / Snapshot
        # Reverted on the target too [L5618-5625].
        conn.data_state_override = ev in (DataEvent.MIRROR_OVERRIDE, DataEvent.RESTORE_COMPLETE)
        conn.set_data_state(tr.new)
    return tr


def notify_target(svc: Service, conn: Connection, old: str, new: str) -> None:
    """Tell the target in-band (after the ops already sent, before the next ones).

    Fire and forget: if the socket is gone the next ``open`` carries the state.
    """
    from dtake.protocol.framing import MsgType

    svc.events.emit(
        4065,
        con_id=conn.rec.id,
        source=svc.node_id,
        source_ip=conn.rec.host,
        reason=getattr(conn, "data_state_reason", "") or f"{old} -> {new}",
    )
    fs = getattr(conn, "_fs", None)
    if fs is None:
        return
    send_lock = getattr(conn, "_send_lock", None)
    locked = send_lock is None or send_lock.acquire(timeout=0.5)
    try:
        if locked:
            conn._flush_batch()  # ops emitted before the change go first
        else:
            # The sender holds its send lock and waits for the connection lock, which our
            # caller may hold (start_mirror): flushing here would deadlock. Its batch then
            # follows this message, which only makes an automatic snapshot a little older.
            log.info("connection %d: data state sent ahead of a pending batch", conn.rec.id)
        fs.send_obj(
            MsgType.REQUEST,
            {
                "id": -1,  # nobody waits for the answer
                "op": "data_state",
                "state": new,
                "reason": getattr(conn, "data_state_reason", ""),
                "snapshot": bool(getattr(conn, "data_state_snapshot", False)),
                "override": bool(getattr(conn, "data_state_override", False)),
            },
        )
    except Exception as exc:  # the reconnect's open carries the state
        log.info("connection %d: data state not sent: %s", conn.rec.id, exc)
    finally:
        if locked and send_lock is not None:
            send_lock.release()


def open_fields(conn: Connection) -> dict[str, Any]:
    """Fields the source adds to its ``open`` request."""
    return {
        "data_state": conn.rec.target_data_state,
        "override": bool(getattr(conn, "data_state_override", False)),
        "block": bool(getattr(conn.rec, "block", False)),
    }


def on_open_response(conn: Connection, resp: dict[str, Any]) -> None:
    """The target's own state wins when it is Restore Required / Snapshot Reverted."""
    theirs = str(resp.get("data_state") or "")
    if theirs in HOLD and conn.rec.target_data_state != theirs:
        ev = (
            DataEvent.SNAPSHOT_REVERTED
            if theirs == SNAPSHOT_REVERTED
            else DataEvent.RESTORE_REQUIRED
        )
        conn.data_state_reason = f"{_label(ev)} on the target"
        conn.data_state_snapshot = False
        conn.data_state_override = False
        conn.set_data_state(theirs)
        conn.replication = "Pending"
        conn.svc.events.emit(4018, what=f"Connection {conn.rec.id} to {conn.label} established")


# ---------------------------------------------------------------------------- target side
def target_event(
    svc: Service,
    st: TargetState,
    ev: DataEvent | None = None,
    *,
    new: str | None = None,
    reason: str = "",
    snapshot: bool | None = None,
    locked: bool = False,
) -> Transition:
    """Record a data state change of a target copy (snapshot first when good -> bad)."""
    old = getattr(st, "data_state", MIRROR_REQUIRED)
    if ev is not None:
        tr = transition(old, ev, auto_remirror=bool(svc.cfg.auto_remirror))
    else:
        assert new is not None
        tr = Transition(old, new, is_good(old) and not is_good(new), reason)
    if snapshot is not None:
        tr = Transition(tr.old, tr.new, snapshot and is_good(old), tr.reason, tr.held)
    if tr.held or not tr.changed:
        return tr
    if tr.snapshot_before:
        snaps = svc.features.get("dtake.service.datafeatures")
        if snaps is not None:
            snaps.snapshots.take_auto(st, reason=reason or tr.reason, locked=locked)
    st.data_state = tr.new
    st.data_state_reason = reason or tr.reason
    svc.target.save()  # write-ahead: on disk before the next op is applied
    svc.events.emit(
        4065,
        con_id=st.conn_id,
        source=st.source_node,
        source_ip=st.source_node,
        reason=st.data_state_reason,
    )
    return tr


def target_open(svc: Service, st: TargetState, req: dict[str, Any]) -> None:
    """A source opened the connection: adopt its state unless ours holds."""
    theirs = str(req.get("data_state") or "")
    if theirs not in STATES:
        return
    mine = getattr(st, "data_state", MIRROR_REQUIRED)
    if mine in HOLD and not req.get("override"):
        return
    if theirs != mine:
        target_event(svc, st, new=theirs, reason=f"source reports {theirs}")


def target_request(svc: Service, st: TargetState, req: dict[str, Any]) -> None:
    """In-band ``data_state`` request from the source."""
    new = str(req.get("state") or "")
    if new not in STATES:
        return
    mine = getattr(st, "data_state", MIRROR_REQUIRED)
    if mine in HOLD and not req.get("override") and new not in HOLD:
        return
    target_event(
        svc,
        st,
        new=new,
        reason=str(req.get("reason") or ""),
        snapshot=bool(req.get("snapshot")),
        locked=False,  # answered between batches: the applier is idle
    )
