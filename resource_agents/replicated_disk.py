"""ocf:dtake:ReplicatedDisk - GeoCluster Replicated Disk as a promotable clone [L2502-2566].

Promoted = the active node: its directory is writable and replicated to every other owner
(GeoCluster's online sequence [L2541-2547], run by the service's replica module).
Unpromoted = a read-only target copy. Freshness is the service's persistent generation +
sequence; this agent only turns it into a promotion score (drbd.ocf's pattern,
anchors-cluster.md §0, §2.1):

* a replica whose data is good and of the newest generation known in the cluster (node
  attribute ``dtake-<rsc>-gen``, lifetime forever, so it survives full-cluster restarts)
  gets a score; a stale, pending or suspect one gets **none**, so pacemaker promotes none:
  *online pending*. Monitor then returns OCF_DEGRADED with the reason, and the seed's
  status text [L3399-3408] is published as node attributes (``crm_mon -A``);
* the operator resolves it with ``dtake grd <action> <rsc> [--node N]`` [L3386-3392];
  accept makes the score 10000 and pacemaker promotes without further steps.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from ocfbase import (
    DEFAULT_PORT,
    OCF_DEGRADED,
    OCF_DEGRADED_PROMOTED,
    OCF_ERR_CONFIGURED,
    OCF_ERR_GENERIC,
    OCF_NOT_RUNNING,
    OCF_RUNNING_PROMOTED,
    OCF_SUCCESS,
    Action,
    Agent,
    AgentError,
    ControlClient,
    Env,
    Handler,
    Param,
    Runner,
    ServiceError,
    StateCache,
    SubprocessRunner,
    log,
)

TYPE_CHECKING = False  # typing costs ~10 ms to import; annotations are strings
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "SCORE_ACCEPTED",
    "SCORE_BEHIND",
    "SCORE_CURRENT",
    "SCORE_FRESH",
    "SCORE_PROMOTED",
    "SCORE_QUEUING",
    "ReplicatedDisk",
    "main",
    "pending_reason",
    "promotion_score",
]

# drbd.ocf's ladder "0 10 1000 10000" (anchors-cluster.md §2.1), with "no score" for data
# that must never be promoted automatically.
SCORE_PROMOTED = 10000  # the active copy keeps its role
SCORE_ACCEPTED = 10000  # the operator chose this copy (grd accept / revert / flush)
SCORE_CURRENT = 1000  # good data of the newest generation
SCORE_BEHIND = 999  # the same, but another copy of that generation applied more after it
SCORE_FRESH = 100  # nobody ever had data: the first online creates the baseline [L2543]
SCORE_QUEUING = 10  # good data still in the target queue: promote drains it first [L3874]

MIRROR_TYPES = ("differences", "checksum", "full", "newer")
COMPRESSION = ("none", "zlib", "zstd")
ORPHANS = ("delete", "log", "off")

PARAMS = [
    Param(
        "directory",
        "Replicated directory",
        "The directory replicated between the owners (the same path on every node). On the "
        "promoted node it is writable; on the others it is a read-only target copy.",
        required=True,
        unique=True,
    ),
    Param(
        "addresses",
        "Replication network",
        'Addresses of the owners on the replication network, as "node1=ADDR node2=ADDR"; a '
        "node not listed is reached by its node name. Keep this traffic off the heartbeat "
        "network [L2587].",
    ),
    Param("port", "Service port", "TCP port of the dtake service.", "integer", str(DEFAULT_PORT)),
    Param(
        "mirror_type",
        "Mirror type",
        "How the promoted node mirrors to the owners: differences, checksum, full or newer.",
        default="differences",
    ),
    Param(
        "compression", "Compression", "none, zlib or zstd (off by default [L5567]).", default="none"
    ),
    Param("compression_level", "Compression level", "Codec level; empty = default.", "integer"),
    Param(
        "orphans",
        "Orphan files",
        "delete (default: owners' copies become exact), log or off.",
        default="delete",
    ),
    Param(
        "sourcefailoverdelay",
        "Source failover delay (s)",
        "On demote/stop, wait up to this many seconds for the queues to drain so every write "
        "reaches the owners (0: up to the op timeout) [L2533].",
        "integer",
        "0",
    ),
    Param(
        "target_queue_limit",
        "Target queue limit (bytes)",
        "Promote waits while this node's target queue holds more than this [L3874, 10004].",
        "integer",
        "0",
    ),
    Param(
        "target_queue_timeout",
        "Target queue timeout (s)",
        "Longest promote waits for the target queue to drain (also bounded by the op timeout).",
        "integer",
        "60",
    ),
    Param(
        "check_unresponsive_interval",
        "Check unresponsive node interval (s)",
        "How often the promoted node retries an owner it cannot reach (event 10000). The "
        "service's reconnect_interval_s applies; this value is validated and reported.",
        "integer",
        "2",
    ),
    Param("socket", "Control socket", "The dtake control socket.", default="/run/dtake/dtake.sock"),
]

ACTIONS = [
    Action("start", "60s"),
    Action("stop", "120s"),
    Action("promote", "120s"),
    Action("demote", "120s"),
    Action("notify", "30s"),
    Action("monitor", "30s", interval="10s", depth="0", role="Promoted"),
    Action("monitor", "30s", interval="11s", depth="0", role="Unpromoted"),
    Action("validate-all", "20s"),
    Action("meta-data", "5s"),
]

LONGDESC = (
    "Replicates a local directory between the nodes of a cluster (GeoCluster Replicated "
    "Disk). Use it as a promotable clone over at least two nodes: the promoted instance is "
    "the active, writable copy and replicates to every other node, whose copies are "
    "read-only. A copy whose data is not known good and current is never promoted "
    "automatically (online pending): see `dtake grd status RESOURCE`."
)

USAGE = (
    "usage: ReplicatedDisk {start|stop|promote|demote|notify|monitor|validate-all|meta-data|usage}"
)


# ---------------------------------------------------------------------------- pure rules
def promotion_score(
    st: Mapping[str, Any], cluster_gen: int, best_position: int | None = None
) -> int | None:
    """The promotion score of this replica, or None (no score: never promoted).

    ``cluster_gen``: the newest generation any node has published (this one included).
    ``best_position``: the highest sequence position published by a copy of that
    generation (the tiebreak between copies of equal generation: the one that applied
    the most after the generation's mirror completed is preferred)."""
    control = st.get("control", "")
    if control in ("failed", "testing"):
        return None
    if st.get("role") == "Promoted":
        return SCORE_PROMOTED
    if control == "accepted":
        return SCORE_ACCEPTED
    gen = int(st.get("generation", 0))
    if gen == 0 and cluster_gen == 0:
        return SCORE_FRESH
    if gen < cluster_gen:
        return None  # stale: another node had a newer generation
    data = st.get("data")
    if data == "good":
        if best_position is not None and int(st.get("position", 0)) < best_position:
            return SCORE_BEHIND
        return SCORE_CURRENT
    if data == "queuing":
        return SCORE_QUEUING
    return None


def pending_reason(st: Mapping[str, Any], cluster_gen: int) -> str | None:
    """Why this unpromoted replica is online pending (None: it is fine)."""
    control = st.get("control", "")
    rsc, node = st.get("resource", "?"), st.get("node", "?")
    text = st.get("status_text", "")
    if control == "failed":
        return f"{text} Failed by the operator; `dtake grd accept {rsc} --node {node}` to use it"
    if control == "testing":
        return (
            f"{text} Testing data (snapshot {st.get('test_snapshot')}): "
            f"`dtake grd accept|reject {rsc} --node {node}`"
        )
    if promotion_score(st, cluster_gen) in (SCORE_CURRENT, SCORE_FRESH, SCORE_ACCEPTED):
        return None  # (SCORE_BEHIND is SCORE_CURRENT with a lower position: never here)
    gen = int(st.get("generation", 0))
    if st.get("data") == "good" and gen < cluster_gen:
        why = f"stale: generation {gen}, the cluster has seen {cluster_gen}"
        text = f"Target {node} is pending. Data integrity not guaranteed."
    else:
        why = st.get("reason") or st.get("data", "")
    return (
        f"{text} ({why}); online pending: `dtake grd status {rsc}`, then "
        f"`dtake grd accept|test-data|fail {rsc} --node {node}`"
    )


def parse_node_attr(cib_nodes_xml: str, name: str) -> dict[str, str]:
    """``cibadmin --query --scope nodes`` -> node -> value of its permanent attribute NAME."""
    import re  # lazy: only when the CIB is read (~6 ms)

    out: dict[str, str] = {}
    attr = re.escape(name)
    # One chunk per <node ...> element (self-closing ones have no attributes).
    for chunk in re.split(r"(?=<node\b)", cib_nodes_xml)[1:]:
        node = re.match(r"<node\b[^>]*?\buname=\"([^\"]+)\"", chunk)
        v = re.search(rf"<nvpair\b[^>]*?name=\"{attr}\"[^>]*?value=\"([^\"]*)\"", chunk)
        if node and v:
            out[node.group(1)] = v.group(1)
    return out


def parse_generations(cib_nodes_xml: str, resource: str) -> dict[str, int]:
    """node -> published generation (``dtake-<rsc>-gen``)."""
    raw = parse_node_attr(cib_nodes_xml, f"dtake-{resource}-gen")
    return {n: int(v) for n, v in raw.items() if v.isdigit()}


def parse_positions(cib_nodes_xml: str, resource: str) -> dict[str, tuple[int, int]]:
    """node -> (generation, position) published as ``dtake-<rsc>-pos`` = "GEN:POS"."""
    out: dict[str, tuple[int, int]] = {}
    for n, v in parse_node_attr(cib_nodes_xml, f"dtake-{resource}-pos").items():
        gen, _, pos = v.partition(":")
        if gen.isdigit() and pos.isdigit():
            out[n] = (int(gen), int(pos))
    return out


def best_position(positions: Mapping[str, tuple[int, int]], generation: int) -> int | None:
    """The highest position published for GENERATION (None: nobody published one)."""
    same = [pos for gen, pos in positions.values() if gen == generation]
    return max(same) if same else None


def parse_peers(crm_node_l: str, me: str) -> list[str]:
    """``crm_node -l`` (id name state) -> the other nodes, in order."""
    names = []
    for line in crm_node_l.splitlines():
        f = line.split()
        if len(f) >= 2 and f[1] != me:
            names.append(f[1])
    return sorted(set(names))


# ---------------------------------------------------------------------------- agent
class ReplicatedDisk(Agent):
    NAME = "ReplicatedDisk"
    SHORTDESC = "Replicated directory (GeoCluster)"
    LONGDESC, PARAMS, ACTIONS, USAGE = LONGDESC, PARAMS, ACTIONS, USAGE
    CHOICES = {"mirror_type": MIRROR_TYPES, "compression": COMPRESSION, "orphans": ORPHANS}
    NUMBERS = (
        "port",
        "compression_level",
        "sourcefailoverdelay",
        "target_queue_limit",
        "target_queue_timeout",
        "check_unresponsive_interval",
    )

    def __init__(
        self,
        env: Env,
        *,
        client: ControlClient | None = None,
        runner: Runner | None = None,
        cache: StateCache | None = None,
        sleep: Any = time.sleep,
    ) -> None:
        super().__init__(env, client=client)
        self.rsc = env.instance
        self.run: Runner = runner or SubprocessRunner()
        self.cache = cache or StateCache(self.rsc)
        self.sleep = sleep

    # -------------------------------------------------------------- helpers

    def status(self) -> dict[str, Any] | None:
        try:
            st: dict[str, Any] = self._call("replica_status", resource=self.rsc)
        except ServiceError as exc:
            if exc.unreachable:
                raise
            return None  # no replica record here: never started on this node
        return st

    @staticmethod
    def receiving(st: Mapping[str, Any]) -> bool:
        """Fed by a live source of its own generation: current by construction."""
        gen = int(st.get("generation", 0))
        return bool(st.get("source_connected")) and int(st.get("source_generation", -1)) == gen

    def cluster_generation(self, st: Mapping[str, Any]) -> int | None:
        view = self.cluster_view(st)
        return None if view is None else view[0]

    def cluster_view(self, st: Mapping[str, Any]) -> tuple[int, int | None] | None:
        """(newest generation in the cluster, best position published for it); in-band
        when receiving from a live source of our own generation (no fork), else from the
        CIB. None when the CIB cannot be read."""
        gen = int(st.get("generation", 0))
        if self.receiving(st) or st.get("role") == "Promoted":
            return gen, None
        rc, out = self.run(["cibadmin", "--query", "--scope", "nodes"], timeout=15)
        if rc != 0:
            return None
        gens = parse_generations(out, self.rsc)
        gens[self.env.node] = max(gen, gens.get(self.env.node, 0))
        newest = max(gens.values(), default=gen)
        positions = parse_positions(out, self.rsc)
        if st.get("data") == "good" and gen == newest:
            positions[self.env.node] = (gen, int(st.get("position", 0)))
        return newest, best_position(positions, newest)

    def _attr(self, name: str, value: str | None, *, lifetime: str = "reboot") -> None:
        key = f"attr:{name}"
        if key in self.cache.data and self.cache.get(key) == value:
            return  # unknown (fresh cache) -> write once, so a stale value never stays
        argv = ["crm_attribute", "-N", self.env.node, "-n", name, "-l", lifetime]
        argv += ["-D"] if value is None else ["-v", value]
        rc, _ = self.run(argv, timeout=15)
        if rc == 0 or value is None:
            self.cache.put(key, value)  # best-effort: retried next monitor on failure

    def publish(
        self, st: Mapping[str, Any], score: int | None, *, keep_score: bool = False
    ) -> None:
        gen = int(st.get("generation", 0))
        if gen > 0:
            self._attr(f"dtake-{self.rsc}-gen", str(gen), lifetime="forever")
        if not keep_score and ("score" not in self.cache.data or self.cache.get("score") != score):
            argv = ["crm_attribute", "-N", self.env.node, "-p", self.rsc, "-l", "reboot"]
            argv += ["-D"] if score is None else ["-v", str(score)]
            rc, _ = self.run(argv, timeout=15)
            if rc == 0 or score is None:
                self.cache.put("score", score)
        self._attr(f"dtake-{self.rsc}-state", str(st.get("data", "unknown")))
        self._attr(f"dtake-{self.rsc}-status", str(st.get("status_text", "")))
        self.cache.save()

    def unpublish(self) -> None:
        self.run(
            ["crm_attribute", "-N", self.env.node, "-p", self.rsc, "-l", "reboot", "-D"],
            timeout=15,
        )
        for name in (f"dtake-{self.rsc}-state", f"dtake-{self.rsc}-status"):
            self.run(
                ["crm_attribute", "-N", self.env.node, "-n", name, "-l", "reboot", "-D"],
                timeout=15,
            )
        self.cache.clear()

    # -------------------------------------------------------------- validate
    def validate(self) -> int:
        p = self.env.param
        d = p("directory")
        if not d:
            raise AgentError(OCF_ERR_CONFIGURED, "parameter directory is required")
        if not d.startswith("/") or os.path.normpath(d) == "/":
            raise AgentError(OCF_ERR_CONFIGURED, f"directory must be an absolute path, not {d!r}")
        self.check_params()
        for item in p("addresses").split():
            if "=" not in item:
                raise AgentError(OCF_ERR_CONFIGURED, f'addresses: "{item}" is not NODE=ADDRESS')
        meta = self.env.meta
        # [L2582]: "must have at least two possible owners to function properly"
        if "clone_max" in meta and int(meta["clone_max"] or 0) < 2:
            raise AgentError(
                OCF_ERR_CONFIGURED,
                "ReplicatedDisk needs at least two owners: make it a promotable clone with clone-max >= 2",
            )
        pmax = meta.get("promoted_max") or meta.get("master_max")
        if pmax and int(pmax) > 1:
            raise AgentError(
                OCF_ERR_CONFIGURED,
                "promoted-max must be 1: two active copies would be merged by nobody",
            )
        for k in ("clone_node_max", "promoted_node_max", "master_node_max"):
            if meta.get(k) and int(meta[k]) > 1:
                raise AgentError(OCF_ERR_CONFIGURED, f"{k.replace('_', '-')} must be 1")
        return OCF_SUCCESS

    # -------------------------------------------------------------- actions
    def start(self) -> int:
        self.validate()
        st = self._call("replica_start", resource=self.rsc, directory=self.env.param("directory"))
        self._refresh_score(st)
        return OCF_SUCCESS

    def stop(self) -> int:
        try:
            self._call(
                "replica_stop",
                resource=self.rsc,
                drain_s=self._drain_s(),
            )
        except ServiceError as exc:
            if not exc.unreachable:
                raise
            # The service is down: nothing replicates and nothing holds the mount open
            # on its behalf. Stop must succeed when already stopped [OCF 1.1].
            log("warning", f"stop: {exc.message}; treating the replica as stopped")
        self.unpublish()
        return OCF_SUCCESS

    def _drain_s(self) -> float:
        delay = int(self.env.param("sourcefailoverdelay", "0") or 0)
        bound = max(0.0, self.env.timeout_s(120.0) - 10.0)
        return float(min(delay, bound)) if delay > 0 else bound

    def monitor(self) -> int:
        st = self.status()
        if st is None or st.get("role") == "Stopped":
            return OCF_NOT_RUNNING
        if st.get("role") == "Promoted":
            self.publish(st, SCORE_PROMOTED)
            if st.get("status_text") != "The status of all targets is OK.":
                self._degraded(f"{st.get('status_text')} (replicating from {self.env.node})")
                return OCF_DEGRADED_PROMOTED
            return OCF_RUNNING_PROMOTED
        reason = self._refresh_score(st)
        if reason:
            self._degraded(reason)
            return OCF_DEGRADED
        return OCF_SUCCESS

    def _degraded(self, reason: str) -> None:
        from ocfbase import exit_reason

        exit_reason(reason)

    def _refresh_score(self, st: Mapping[str, Any]) -> str | None:
        gen = int(st.get("generation", 0))
        if gen and st.get("data") == "good" and not self.receiving(st):
            # The source is gone: tell the other copies how far this one got, before
            # reading theirs (forever: in the nodes section, read with the generations).
            self._attr(
                f"dtake-{self.rsc}-pos", f"{gen}:{int(st.get('position', 0))}", lifetime="forever"
            )
        view = self.cluster_view(st)
        if view is None:
            # No CIB (no cluster, or it is busy): keep whatever score was published.
            cluster_gen = gen
            self.publish(st, None, keep_score=True)
        else:
            cluster_gen, best = view
            self.publish(st, promotion_score(st, cluster_gen, best))
        return pending_reason(st, cluster_gen)

    def _peers(self) -> list[dict[str, Any]]:
        rc, out = self.run(["crm_node", "-l"], timeout=15)
        names = parse_peers(out, self.env.node) if rc == 0 else []
        addrs = dict(item.split("=", 1) for item in self.env.param("addresses").split())
        port = int(self.env.param("port") or DEFAULT_PORT)
        return [{"node": n, "host": addrs.get(n, n), "port": port} for n in names]

    def promote(self) -> int:
        self.validate()
        st = self.status()
        if st is None or st.get("role") == "Stopped":
            raise AgentError(OCF_ERR_GENERIC, "promote: the replica is not started on this node")
        if st.get("role") == "Promoted":
            return OCF_SUCCESS
        cluster_gen = self.cluster_generation(st)
        if cluster_gen is None:  # no CIB (e.g. ocf-tester): only our own knowledge
            cluster_gen = int(st.get("generation", 0))
        score = promotion_score(st, cluster_gen)
        if score is None:
            self.publish(st, None)
            self.sleep(min(15.0, self.env.timeout_s(120.0) / 4))  # drbd.ocf's anti-loop pause
            raise AgentError(
                OCF_ERR_GENERIC,
                pending_reason(st, cluster_gen) or "refusing to promote: data not current",
            )
        self._wait_target_queue(st)
        st = self._call(
            "replica_promote",
            timeout=self.env.timeout_s(120.0),
            resource=self.rsc,
            peers=self._peers(),
            cluster_generation=cluster_gen,
            mirror=self.env.param("mirror_type", "differences") or "differences",
            orphans=self.env.param("orphans", "delete") or "delete",
            compression=self.env.param("compression", "none") or "none",
            compression_level=int(self.env.param("compression_level"))
            if self.env.param("compression_level")
            else None,
        )
        self.publish(st, SCORE_PROMOTED)
        return OCF_SUCCESS

    def _wait_target_queue(self, st: Mapping[str, Any]) -> None:
        """[L3874] 10004: promote only once the target queue is below the limit, or the
        timeout (bounded by the op timeout) expired."""
        limit = int(self.env.param("target_queue_limit", "0") or 0)
        timeout = min(
            float(self.env.param("target_queue_timeout", "60") or 60),
            max(0.0, self.env.timeout_s(120.0) - 20.0),
        )
        deadline = time.monotonic() + timeout
        logged = False
        while int(st.get("queued_bytes", 0)) > limit and time.monotonic() < deadline:
            if not logged:
                log("warning", f"10004: failover of {self.rsc} delayed: target queue draining")
                logged = True
            self.sleep(1.0)
            st = self._call("replica_status", resource=self.rsc)

    def demote(self) -> int:
        st = self.status()
        if st is None or st.get("role") != "Promoted":
            return OCF_SUCCESS
        st = self._call(
            "replica_demote",
            timeout=self.env.timeout_s(120.0),
            resource=self.rsc,
            drain_s=self._drain_s(),
        )
        self._refresh_score(st)
        return OCF_SUCCESS

    def notify(self) -> int:
        return OCF_SUCCESS  # pacemaker ignores notify failures; nothing to do here

    def handlers(self) -> dict[str, Handler]:
        return {
            **super().handlers(),
            "promote": self.promote,
            "demote": self.demote,
            "notify": self.notify,
        }


main = ReplicatedDisk.main
