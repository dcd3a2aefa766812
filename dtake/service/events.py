"""Event log with the seed's numeric IDs and texts ([L3560-3830], seed-monitoring.md §4).

Events are kept in a bounded in-memory ring (for `dtake events`), appended to
``<state_dir>/dtake.log`` (one JSON object per line, series rotation: ``max_file_bytes``
per file, ``max_files`` kept), sent to journald when its socket exists (structured
fields DT_EVENT_ID, DT_SEVERITY; PRIORITY 3/4/6) and to the Python logger.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any

from dtake.config import DEFAULT_PORT

__all__ = ["EVENTS", "JOURNAL_SOCKET", "EventLog"]

JOURNAL_SOCKET = "/run/systemd/journal/socket"
_PRIORITY = {"error": 3, "warning": 4}  # info -> 6 (seed-monitoring.md §4.1 DESIGN)


class _Fields(dict[str, Any]):
    """Template fields; a missing one renders empty (target_ip falls back to target)."""

    def __missing__(self, key: str) -> Any:
        if key == "target_ip":
            return str(self.get("target", "")).rsplit(":", 1)[0]
        return ""


def _journal(rec: dict[str, Any]) -> None:
    """Send to journald when it runs (native protocol); no systemd -> nothing."""
    if not os.path.exists(JOURNAL_SOCKET):
        return
    fields = {
        "MESSAGE": str(rec["message"]),
        "PRIORITY": str(_PRIORITY.get(str(rec["severity"]), 6)),
        "SYSLOG_IDENTIFIER": "dtake",
        "DT_EVENT_ID": str(rec["id"]),
        "DT_SEVERITY": str(rec["severity"]),
    }
    payload = "".join(f"{k}={v.replace(chr(10), ' ')}\n" for k, v in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(payload, JOURNAL_SOCKET)
    except OSError:
        pass


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
    4045: (
        "warning",
        f"The port {{port}} is out of range; the default port {DEFAULT_PORT} is used",
    ),
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
    # Target apply retries (dtake.service.target._apply) [L3761-3765].
    4110: (
        "warning",
        "Target cannot write {path} due to target disk being full. Operation will be retried ({limit} times or forever)",
    ),
    4111: (
        "warning",
        "Target can not write {path} due to a sharing violation. Operation will be retried ({limit} times or forever)",
    ),
    4112: (
        "warning",
        "Target can not write {path} due to access denied. Operation will be retried ({limit} times or forever)",
    ),
    4113: (
        "warning",
        "Target can not write {path} due to an unknown reason. Operation will be retried ({limit} times or forever). Please check the log files for further information on the error.",
    ),
    4120: ("info", "Target write to {path} was completed successfully after {retries} retries."),
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


_SRC = "Service has {what} to {target} ({target_ip}) for Replication Set {repset}, ID: {con_id}"

# Data safety (dtake.service.datafeatures): seed texts [L3666-3912], %n -> field names.
EVENTS.update(
    {
        94: ("info", "Verification started {con_id}"),
        95: ("info", "Verification ended {con_id}"),
        97: ("info", "Restore started {con_id}"),
        98: ("info", "Restore completed {con_id}"),
        4018: (
            "warning",
            "{what}, however, mirroring and replication have been disabled as a restore is "
            "required due to a previous failover.",
        ),
        4048: ("info", _SRC.replace("{what}", "started a delete orphans task")),
        4049: ("info", _SRC.replace("{what}", "paused a delete orphans task")),
        4050: ("info", _SRC.replace("{what}", "resumed a delete orphans task")),
        4051: ("info", _SRC.replace("{what}", "stopped a delete orphans task")),
        4052: ("info", _SRC.replace("{what}", "completed a delete orphans task")),
        4053: ("info", _SRC.replace("{what}", "started a restore task")),
        4054: ("info", _SRC.replace("{what}", "paused a restore task")),
        4055: ("info", _SRC.replace("{what}", "resumed a restore task")),
        4056: ("info", _SRC.replace("{what}", "stopped a restore task")),
        4057: ("info", _SRC.replace("{what}", "completed a restore task")),
        4058: ("info", _SRC.replace("{what}", "started a verification task")),
        4059: ("info", _SRC.replace("{what}", "paused a verification task")),
        4060: ("info", _SRC.replace("{what}", "resumed a verification task")),
        4061: ("info", _SRC.replace("{what}", "stopped a verification task")),
        4062: ("info", _SRC.replace("{what}", "completed a verification task")),
        4065: (
            "warning",
            "Target data state for connection {con_id} from {source} ({source_ip}) has "
            "changed because {reason}.",
        ),
        4069: (
            "warning",
            "The option MoveOrphansDir has been updated because it was missing or empty.",
        ),
        4300: (
            "error",
            "A connection request was received on the target before the persistent target "
            "paths could be loaded.",
        ),
        4301: ("error", "Unable to block target paths, the driver is unavailable."),
        4302: ("info", "Target Path {path} has been successfully blocked"),
        4303: ("warning", "Blocking of target path: {path} failed. Error Code: {code}"),
        4304: ("info", "Target Path {path} has been successfully unblocked"),
        4305: ("warning", "Unblocking of target path: {path} failed. Error Code: {code}"),
        4306: (
            "warning",
            "Target paths for source {source} ({source_ip}) Connection id: {con_id} are "
            "already blocked",
        ),
        4307: (
            "warning",
            "Target paths for source {source} ({source_ip}) Connection id: {con_id} are "
            "already unblocked",
        ),
        4308: (
            "error",
            "Error loading target paths for blocking, registry key {key} has been corrupted.",
        ),
        4400: (
            "error",
            "Failed to create snapshot set for source {source} ({source_ip}) Connection ID: "
            "{con_id}. Error: {error}",
        ),
        4401: (
            "error",
            "Failed to delete automatic snapshot set for source {source} ({source_ip}) "
            "Connection ID: {con_id}. Error: {error}",
        ),
        4402: (
            "error",
            "Failed to delete snapshot set for source {source} ({source_ip}) Connection ID: "
            "{con_id}. Error: {error}",
        ),
        4403: (
            "error",
            "A scheduled snapshot could not be created for source {source} ({source_ip}) "
            "Connection ID: {con_id}. because the target data was in a bad state. A snapshot "
            "will automatically be created when the target data reaches a good state.",
        ),
        4404: (
            "info",
            "Set snapshot schedule for source {source} ({source_ip}) connection {con_id} to "
            "every {minutes} minutes. Next snapshot: {next}.",
        ),
        4405: (
            "info",
            "Removed snapshot schedule for source {source} ({source_ip}) connection {con_id}.",
        ),
        4406: (
            "info",
            "Enabled snapshot schedule for source {source} ({source_ip}) connection {con_id}.",
        ),
        4407: (
            "info",
            "Disabled snapshot schedule for source {source} ({source_ip}) connection {con_id}.",
        ),
        4408: (
            "warning",
            "{node} was unable to move some orphans for source {source} on connection ID "
            "{con_id}. Check the {node} logs for further details.",
        ),
        4409: (
            "warning",
            "{node} was unable to delete some orphans for source {source} on connection ID "
            "{con_id}. Check the {node} logs for further details.",
        ),
        11007: ("warning", "Verification has finished with errors. {details}"),
    }
)


class EventLog:
    def __init__(self, path: str | None, *, keep: int = 5000) -> None:
        self._ring: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        self._path = path
        self._seq = 0

    def emit(self, event_id: int, **fields: Any) -> dict[str, Any]:
        severity, template = EVENTS.get(event_id, ("info", "event {event_id}"))
        try:
            text = template.format_map(_Fields(event_id=event_id, **fields))
        except (KeyError, IndexError, ValueError):
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
                    self._rotate_if_full()
                    with open(self._path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec) + "\n")
                except OSError:
                    pass
            _journal(rec)
        level = {"error": logging.ERROR, "warning": logging.WARNING}.get(severity, logging.INFO)
        log.log(level, "[%d] %s", event_id, text)
        return rec

    # Series rotation (seed-monitoring.md §3.2): the current file is ``path``; full files
    # become ``path.1``, ``path.2``, ... (series 1-999, then wrapping), and only the newest
    # ``max_files`` are kept (creating #6 deletes #1 with the default 5).
    max_file_bytes: int = 1048576
    max_files: int = 5

    def _rotate_if_full(self) -> None:
        assert self._path is not None
        try:
            if os.path.getsize(self._path) < self.max_file_bytes:
                return
        except FileNotFoundError:
            return
        series = self._series()
        nxt = (max(series) % 999) + 1 if series else 1
        os.replace(self._path, f"{self._path}.{nxt}")
        series = [n for n in series if n != nxt] + [nxt]
        for n in series[: max(0, len(series) - (self.max_files - 1))]:
            try:
                os.unlink(f"{self._path}.{n}")
            except OSError:
                continue  # seed: a file that cannot be removed stays in the list

    def _series(self) -> list[int]:
        """Existing rotated series numbers, oldest first (by modification time)."""
        assert self._path is not None
        d, base = os.path.split(self._path)
        found = []
        for name in os.listdir(d or "."):
            if name.startswith(base + ".") and name[len(base) + 1 :].isdigit():
                p = os.path.join(d, name)
                found.append((os.stat(p).st_mtime_ns, int(name[len(base) + 1 :])))
        return [n for _, n in sorted(found)]

    def since(self, seq: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        with self._lock:
            items = [r for r in self._ring if r["seq"] > seq]
        return items[-limit:]

    def ids(self) -> list[int]:
        with self._lock:
            return [int(r["id"]) for r in self._ring]
