"""ocf:dtake:SourceConnection - Double-Take Source Connection [L2416-2500].

A primitive in a group after the Filesystem and IPaddr2 resources: it owns the connection
of a replication set to an external target, so the connection follows the group.

* start: ensure the replication set (same name and rules on every node [L2436-2450]),
  connect it to the target, and run a difference mirror (whatever changed while the
  connection was elsewhere reaches the target; nothing is copied twice);
* monitor: the connection's state - Started -> running; queuing, paused or mirroring ->
  OCF_DEGRADED; Error -> failure; no connection -> not running;
* stop: drain the queue within the stop timeout, then disconnect [L4731].

The connection is *cluster managed*: the service does not restore it by itself after a
restart ("Automatically Reconnect During Source Initialization" off [L2461]).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ocfbase import (
    DEFAULT_PORT,
    OCF_DEGRADED,
    OCF_ERR_CONFIGURED,
    OCF_ERR_GENERIC,
    OCF_NOT_RUNNING,
    OCF_SUCCESS,
    Action,
    Agent,
    AgentError,
    Param,
    ServiceError,
    exit_reason,
    log,
)

TYPE_CHECKING = False  # typing costs ~10 ms to import; annotations are strings
if TYPE_CHECKING:
    from typing import Any

__all__ = ["SourceConnection", "connection_health", "main"]

MIRROR_TYPES = ("differences", "checksum", "full", "newer", "none")
COMPRESSION = ("none", "zlib", "zstd")
ORPHANS = ("off", "log", "delete")

PARAMS = [
    Param(
        "repset",
        "Replication set",
        "Name of the replication set (exact, case-sensitive; the same on every node).",
        required=True,
        unique=True,
    ),
    Param(
        "rules",
        "Replication set rules",
        'The set\'s rules in the seed\'s form, separated by ";": "/srv/data inc, rec; '
        '/srv/data/tmp exc, rec". Identical on every node.',
        required=True,
    ),
    Param("target", "Target", "Target host name or address.", required=True),
    Param(
        "port",
        "Target port",
        "TCP port of the target's dtake service.",
        "integer",
        str(DEFAULT_PORT),
    ),
    Param(
        "target_path",
        "Target path",
        "Directory on the target that receives the set's base.",
        required=True,
    ),
    Param(
        "route",
        "Route",
        "Address used to reach the target instead of its name (e.g. a replication network).",
    ),
    Param(
        "mirror_type",
        "Mirror type",
        "Mirror run on start: differences (default), checksum, full, newer or none.",
        default="differences",
    ),
    Param("compression", "Compression", "none, zlib or zstd.", default="none"),
    Param("compression_level", "Compression level", "Codec level; empty = default.", "integer"),
    Param(
        "bandwidth",
        "Bandwidth limit (kbit/s)",
        "0 = unlimited. A limit needs a service with bandwidth limiting; start fails with a "
        "reason otherwise.",
        "integer",
        "0",
    ),
    Param("orphans", "Orphan files", "off (default [L2472]), log or delete.", default="off"),
    Param("socket", "Control socket", "The dtake control socket.", default="/run/dtake/dtake.sock"),
]

ACTIONS = [
    Action("start", "120s"),
    Action("stop", "120s"),
    Action("monitor", "30s", interval="10s", depth="0"),
    Action("validate-all", "20s"),
    Action("meta-data", "5s"),
]

LONGDESC = (
    "Owns the dtake connection of a replication set to a target, so it follows the "
    "resource group between nodes (Double-Take Source Connection). Put it in a group "
    "after the Filesystem and IP address resources. Start connects and runs a difference "
    "mirror; stop drains the queue within the stop timeout, then disconnects."
)

USAGE = "usage: SourceConnection {start|stop|monitor|validate-all|meta-data|usage}"


def connection_health(c: Mapping[str, Any]) -> tuple[int, str]:
    """(rc, reason) for one connection's status (dtake status fields)."""
    state = c.get("state")
    if state == "Error":
        return OCF_ERR_GENERIC, f"connection to {c.get('target')} failed: {c.get('last_error')}"
    if state in ("Paused", "Stopped"):
        return OCF_DEGRADED, f"connection to {c.get('target')} is {str(state).lower()}, queuing"
    if c.get("mirror_status") not in ("Idle", None):
        return OCF_DEGRADED, f"mirror to {c.get('target')}: {c.get('mirror_status')}"
    if c.get("target_data_state") != "OK":
        return OCF_DEGRADED, f"target data state {c.get('target_data_state')}"
    return OCF_SUCCESS, ""


class SourceConnection(Agent):
    NAME = "SourceConnection"
    SHORTDESC = "dtake source connection"
    LONGDESC, PARAMS, ACTIONS, USAGE = LONGDESC, PARAMS, ACTIONS, USAGE
    CHOICES = {"mirror_type": MIRROR_TYPES, "compression": COMPRESSION, "orphans": ORPHANS}
    NUMBERS = ("port", "compression_level", "bandwidth")

    @property
    def host(self) -> str:
        return self.env.param("route") or self.env.param("target")

    @property
    def port(self) -> int:
        return int(self.env.param("port") or DEFAULT_PORT)

    def rules(self) -> list[str]:
        return [r.strip() for r in self.env.param("rules").split(";") if r.strip()]

    def find(self) -> dict[str, Any] | None:
        st = self._call("status")
        tp = os.path.normpath(self.env.param("target_path") or "/")
        for c in st.get("connections", []):
            if (
                c.get("repset") == self.env.param("repset")
                and c.get("target") == f"{self.host}:{self.port}"
                and os.path.normpath(c.get("target_path", "")) == tp
            ):
                return dict(c)
        return None

    # -------------------------------------------------------------- actions
    def validate(self) -> int:
        p = self.env.param
        for name in ("repset", "rules", "target", "target_path"):
            if not p(name):
                raise AgentError(OCF_ERR_CONFIGURED, f"parameter {name} is required")
        if not p("target_path").startswith("/"):
            raise AgentError(OCF_ERR_CONFIGURED, "target_path must be an absolute path")
        if "/" in p("repset"):
            raise AgentError(OCF_ERR_CONFIGURED, "repset must not contain '/'")
        for r in self.rules():
            if not r.startswith("/"):
                raise AgentError(OCF_ERR_CONFIGURED, f'rule "{r}" must start with an absolute path')
        self.check_params()
        return OCF_SUCCESS

    def start(self) -> int:
        self.validate()
        p = self.env.param
        self._call("repset_create", name=p("repset"), rules=self.rules(), replace=True)
        c = self.find()
        if c is None:
            args: dict[str, Any] = {
                "repset": p("repset"),
                "host": self.host,
                "port": self.port,
                "target_path": p("target_path"),
                "mirror": p("mirror_type") or "differences",
                "orphans": p("orphans") or "off",
                "compression": p("compression") or "none",
                "compression_level": int(p("compression_level"))
                if p("compression_level")
                else None,
            }
            if int(p("bandwidth", "0") or 0) > 0:
                args["bandwidth_kbps"] = int(p("bandwidth"))
            try:
                c = self._call("connect", **args)
            except ServiceError as exc:
                if "bandwidth" in exc.message:
                    raise AgentError(
                        OCF_ERR_CONFIGURED,
                        f"bandwidth limiting is not supported by this dtake service: {exc.message}",
                    ) from exc
                raise
        else:
            if c.get("state") in ("Stopped", "Paused"):
                self._call("transmit", con_id=c["id"], action="start")
            if c.get("mirror_status") == "Idle" and (p("mirror_type") or "differences") != "none":
                try:
                    self._call("mirror", con_id=c["id"], action="start", mode="differences")
                except ServiceError as exc:
                    log("info", f"start: mirror not restarted: {exc.message}")
        # Start returns once the difference mirror is done when that fits in the op timeout
        # (dependents start right after us); a longer mirror goes on, shown as degraded.
        wait = min(60.0, self.remaining() / 2)
        try:
            self._call("wait", timeout=wait + 5, con_id=int(c["id"]), timeout_s=wait)
        except ServiceError as exc:
            log("info", f"start: mirror still running after {wait:g}s: {exc.message}")
        try:
            self._call("replica_manage", con_id=int(c["id"]))
        except ServiceError as exc:
            log("warning", f"start: connection {c['id']} not marked cluster-managed: {exc.message}")
        return OCF_SUCCESS

    def monitor(self) -> int:
        c = self.find()
        if c is None:
            return OCF_NOT_RUNNING
        rc, reason = connection_health(c)
        if reason:
            exit_reason(reason)
        if rc == OCF_ERR_GENERIC and self.env.is_probe:
            return OCF_DEGRADED  # a probe reports; the recurring monitor fails it
        return rc

    def stop(self) -> int:
        try:
            c = self.find()
        except ServiceError as exc:
            if not exc.unreachable:
                raise
            log("warning", f"stop: {exc.message}; no connection can be running")
            return OCF_SUCCESS
        if c is None:
            return OCF_SUCCESS
        drain = max(0.0, self.remaining() - 5.0)  # the disconnect needs the rest
        if c.get("state") == "Started" and drain > 0:
            try:
                self._call("wait", timeout=drain + 5, con_id=c["id"], timeout_s=drain)
            except ServiceError as exc:
                # The queue did not drain in time: disconnect anyway (stop must finish);
                # the next start's difference mirror sends what was left [L5048].
                log("warning", f"stop: queue not drained: {exc.message}")
        self._call("disconnect", con_id=c["id"])
        return OCF_SUCCESS


main = SourceConnection.main
