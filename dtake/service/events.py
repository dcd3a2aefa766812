"""Event log with the seed's numeric IDs and texts ([L3560-3830], seed-monitoring.md §4).

Events are kept in a bounded in-memory ring (for `dtake events`) and appended to
``<state_dir>/dtake.log`` (one JSON object per line) and to the Python logger.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from typing import Any

__all__ = ["EVENTS", "EventLog"]

log = logging.getLogger("dtake")

# id -> (severity, text template). Texts follow the seed; %-placeholders as in the seed.
EVENTS: dict[int, tuple[str, str]] = {
    71: ("info", "Originator attempting ip://{target}"),
    72: ("info", "Connection request from ip://{source}"),
    73: ("info", "Connected to ip://{target}"),
    76: ("error", "Connection failed to ip://{target}"),
    77: ("warning", "Connection lost with IP address {target}"),
    74: ("info", "Connection paused with ip://{target}"),
    75: ("info", "Connection resumed with ip://{target}"),
    78: ("warning", "Auto-disconnect threshold has been reached."),
    80: ("info", "Trying to auto-retransmit to ip://{target}"),
    81: ("info", "Schedule transmit start to target {target}"),
    82: ("info", "Schedule transmit end to target {target}"),
    85: ("warning", "{repset} has been auto-disconnected"),
    801: (
        "warning",
        "Auto-disconnect has occurred on {target} with connection {con_id} Disconnected "
        "replication set name: {repset}.",
    ),
    4007: (
        "warning",
        "Auto-disconnecting from {target} for Replication Set {repset}, ID: {con_id} due to {reason}",
    ),
    4008: (
        "info",
        "Auto-disconnect has succeeded for {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4009: ("info", "Auto-reconnecting Replication Set {repset} to {target}"),
    4010: ("info", "Auto-reconnect has succeeded connecting Replication Set {repset} to {target}"),
    4011: ("error", "Auto-reconnect has failed connecting Replication Set {repset} to {target}"),
    4014: ("info", "Service has started network transmission."),
    4015: ("info", "Service has stopped network transmission."),
    4026: ("info", "The target has been paused due to user intervention."),
    4027: ("info", "The target has been resumed due to user intervention."),
    4063: ("info", "Bandwidth limit to {target} has changed to {limit}."),
    4064: ("info", 'Bandwidth limit to {target} is now in the "{period}" period at {at}.'),
    87: ("info", "Start replication on connection {con_id}"),
    88: ("info", "Stop replication on connection {con_id}"),
    89: ("info", "Mirror started {con_id}"),
    90: ("info", "Mirror stopped {con_id}"),
    91: ("info", "Mirror paused {con_id}"),
    92: ("info", "Mirror resumed {con_id}"),
    93: ("info", "Mirror ended {con_id}"),
    99: ("info", "RepSet Modified: {repset}"),
    4003: ("info", "Service has started"),
    4004: ("info", "Service has stopped"),
    4016: ("info", "Connection established to {target} for Replication Set {repset}, ID: {con_id}"),
    4017: (
        "info",
        "Connection to {target} for Replication Set {repset}, ID: {con_id} disconnected",
    ),
    4019: (
        "info",
        "Service has started a mirror to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4020: (
        "info",
        "Service has paused a mirror to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4021: (
        "info",
        "Service has resumed a mirror to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4022: (
        "info",
        "Service has stopped a mirror to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4023: (
        "info",
        "Service has completed a mirror to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4024: (
        "info",
        "Service has started replication to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4025: (
        "info",
        "Service has stopped replication to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4045: ("warning", "The port {port} is out of range; the default port 6320 is used"),
    4046: ("error", "The port {port} is in use by another application"),
    4058: (
        "info",
        "Service has started a verification task to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4062: (
        "info",
        "Service has completed a verification task to {target} for Replication Set {repset}, ID: {con_id}",
    ),
    4099: (
        "warning",
        "The driver detected a hard link for a file {path}. Hard links are not supported. Changes to this file will not be replicated.",
    ),
    4150: (
        "error",
        "Target write failed for {path}; operation dropped, the target needs a mirror ({error})",
    ),
    # DESIGN ids (no seed equivalent): gaps that force a remirror.
    51001: (
        "warning",
        "Change capture overflowed for connection {con_id}; Mirror Required, a difference mirror restores the target",
    ),
    51002: ("warning", "Source queue exhausted for connection {con_id}; Mirror Required"),
    51003: ("warning", "Peer {peer} failed authentication"),
}


class EventLog:
    def __init__(self, path: str | None, *, keep: int = 5000) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._path = path
        self._seq = 0

    def emit(self, event_id: int, **fields: Any) -> dict[str, Any]:
        severity, template = EVENTS.get(event_id, ("info", "event {event_id}"))
        try:
            text = template.format(event_id=event_id, **fields)
        except (KeyError, IndexError):
            text = template
        with self._lock:
            self._seq += 1
            rec = {
                "seq": self._seq,
                "time": time.time(),
                "id": event_id,
                "severity": severity,
                "message": text,
                **{k: v for k, v in fields.items() if isinstance(v, str | int | float | bool)},
            }
            self._ring.append(rec)
            if self._path:
                try:
                    with open(self._path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec) + "\n")
                except OSError:
                    pass
        level = {"error": logging.ERROR, "warning": logging.WARNING}.get(severity, logging.INFO)
        log.log(level, "[%d] %s", event_id, text)
        return rec

    def since(self, seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            items = [r for r in self._ring if r["seq"] > seq]
        return items[-limit:]

    def ids(self) -> list[int]:
        with self._lock:
            return [int(r["id"]) for r in self._ring]
