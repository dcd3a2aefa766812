"""Statistics with the seed's DTStat names (seed-monitoring.md §5.3-§5.4) and their
Prometheus text exposition (``/metrics``, off by default: ``data_safety.metrics.port``).

Only the fields that mean something on Linux are produced: KERNEL (SourceState,
TargetState, Start Time, Rep/Mir ops and bytes, failed mirror/replication reads),
TARGET (one block per source: ops received, retries, drops, ops remaining, orphans
removed, target queue bytes), SOURCE (auto (dis)connects, last file touched) and
CONNECTION (one block per connection: conState, queues, bytes before and after
compression, resent ops, disk queue, bandwidth limit, mirror progress, and dtake's own
conVanishedResentCount/conReplacedResentCount: paths sent again after a rename, and
conRelinkedSentCount: files sent once no longer hard-linked). Fields with no
Linux meaning (allocators, activation codes, driver queue, task commands, separate
mirror queues) are left out, never shown as a made-up 0 (docs/data-safety.md). The exposition format is written by hand
(text format 0.0.4), so no extra dependency is needed.
"""

from __future__ import annotations

import http.server
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dtake.service.daemon import Service

__all__ = ["CON_STATE", "MetricsServer", "collect", "exposition", "render_dtstat"]

log = logging.getLogger("dtake.metrics")

# conState from the transmit mode (seed-monitoring.md §1.6): Scheduled+Error = 12.
CON_STATE = {"Started": 1, "Paused": 2, "Scheduled": 4, "Error": 8, "Stopped": 0}


class _LastTouched:
    """Which connection sent an op most recently, as seen between two collections.

    Each connection keeps its own last path (``stats["last_file_touched"]``); the
    SOURCE block has one ``lastFileTouched``: the path of the connection whose op
    counter moved last (ties: the one seen first)."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[int, int]] = {}  # con id -> (ops_sent, tick)
        self._tick = 0
        self._lock = threading.Lock()

    def pick(self, conns: list[dict[str, Any]]) -> str:
        with self._lock:
            best: tuple[int, str] = (-1, "")
            for c in conns:
                ops = int(c["stats"].get("ops_sent", 0))
                prev = self._seen.get(c["id"])
                if prev is None or prev[0] != ops:
                    self._tick += 1
                    prev = self._seen[c["id"]] = (ops, self._tick)
                path = str(c["stats"].get("last_file_touched", "") or "")
                if path and prev[1] > best[0]:
                    best = (prev[1], path)
            return best[1]


_last_touched: dict[int, _LastTouched] = {}


def collect(svc: Service) -> dict[str, Any]:
    """The seed's DTStat fields that have a Linux meaning; the rest are left out, not
    reported as 0 (docs/data-safety.md, Statistics, lists which and why)."""
    st = svc.status()
    feat = svc.features.get("dtake.service.datafeatures")
    orphans = dict(getattr(feat, "orphan_stats", {}) or {})
    conns = st["connections"]

    def total(key: str) -> int:
        return sum(int(c["stats"].get(key, 0)) for c in conns)

    kernel = {
        "SourceState": 2 if conns else 1,  # 2: running with change capture
        "TargetState": 1,
        "StartTime": time.ctime(svc.started),
        "RepOpsGenerated": total("replication_ops"),
        "RepBytesGenerated": total("bytes_sent") - total("mirror_bytes_sent"),
        "MirOpsGenerated": total("files_sent"),
        "MirBytesGenerated": total("mirror_bytes_sent"),
        "FailedMirrorCount": total("mirror_failures"),
        "FailedRepCount": max(0, total("read_failures") - total("mirror_failures")),
    }
    targets = []
    for t in st["targets"]:
        tq = t.get("target_queue") or {}
        targets.append(
            {
                "PeerAddress": t["source_node"],
                "TargetPath": t["target_path"],
                "Ops Received": t.get("ops_applied", 0),
                "Retries": t.get("retries", 0),
                "OpsDropped": t.get("failures", 0),
                "Ops Remaining": tq.get("ops", 0),
                "Orphan Files Removed": orphans.get("files", 0),
                "Orphan Directories Removed": orphans.get("dirs", 0),
                "Orphan Bytes Removed": orphans.get("bytes", 0),
                "Bytes In Target Queue": tq.get("bytes", 0),
                "Bytes Applied": t.get("bytes_applied", 0),
                "DataState": t.get("data_state", ""),
            }
        )
    touched = _last_touched.setdefault(id(svc), _LastTouched())
    source = {
        "autoDisConnects": sum(int(c.get("auto_disconnects", 0)) for c in conns),
        "autoReConnects": sum(int(c.get("auto_reconnects", 0)) for c in conns),
        "lastFileTouched": touched.pick(conns),
    }
    connections = []
    for c in conns:
        q = c.get("queue") or {}
        limit = c.get("bandwidth_limit_kbps")
        connections.append(
            {
                "id": c["id"],
                "repset": c["repset"],
                "conPeerAddress": c["target"],
                "connectTime": time.ctime(c["connected_since"]) if c["connected_since"] else "",
                "conState": CON_STATE.get(c["state"], 0),
                "conOpsInCmdQueue": (c.get("target_queue") or {}).get("ops", 0),
                "conOpsInAckQueue": c["unacked_ops"],
                "conOpsInRepQueue": c["queued_items"],
                "conBytesInRepQueue": c["queued_bytes"],
                "conOpsTx": c["stats"].get("ops_sent", 0),
                "conBytesTx": c.get("bytes_sent_uncompressed", c["stats"].get("bytes_sent", 0)),
                "conBytesCompressedTx": c.get("bytes_sent_compressed", 0),
                "conResentOpCount": c["stats"].get("resent_ops", 0),
                "conVanishedResentCount": c["stats"].get("vanished_resent", 0),
                "conReplacedResentCount": c["stats"].get("replaced_resent", 0),
                "conRelinkedSentCount": c["stats"].get("relinked_sent", 0),
                "conBytesInDiskQueue": q.get("disk_bytes", 0),
                "conBandwidthLimit": "Unlimited" if not limit else f"{limit:g} kbps",
                "conBytesSkipped": c["stats"].get("mirror_bytes_skipped", 0),
                "conMirrorPercent": _percent(c["mirror_status"]),
                "lastFileTouched": c["stats"].get("last_file_touched", ""),
                "targetDataState": c["target_data_state"],
                "mirrorStatus": c["mirror_status"],
                "replicationStatus": c["replication_status"],
            }
        )
    return {
        "time": time.time(),
        "node": st["node"],
        "KERNEL": kernel,
        "TARGET": targets,
        "SOURCE": source,
        "CONNECTION": connections,
    }


def _percent(mirror_status: str) -> float | None:
    if mirror_status.endswith("%"):
        return float(mirror_status[:-1])
    return 100.0 if mirror_status == "Idle" else None


def render_dtstat(d: dict[str, Any]) -> str:
    """The DTStat screen layout [L3938-3998] (sections ``NAME::``, 33 ``=``)."""
    t = time.localtime(d["time"])
    frac = int((d["time"] % 1) * 10000)
    k = d["KERNEL"]
    out = [
        "=" * 33,
        time.strftime("%m/%d/%y %H:%M:%S", t) + f":{frac:04}",
        "=" * 33,
        f"KERNEL::SourceState: {k['SourceState']} TargetState: {k['TargetState']} "
        f"Start Time: {k['StartTime']}",
        f"  RepOpsGenerated: {k['RepOpsGenerated']} RepBytesGenerated: {k['RepBytesGenerated']}",
        f"  MirOpsGenerated: {k['MirOpsGenerated']} MirBytesGenerated: {k['MirBytesGenerated']}",
        f"   FailedMirrorCount: {k['FailedMirrorCount']} FailedRepCount: {k['FailedRepCount']}",
    ]
    for t_ in d["TARGET"]:
        out += [
            f"TARGET:: PeerAddress: {t_['PeerAddress']} LocalAddress: {d['node']}",
            f"   Ops Received: {t_['Ops Received']}",
            f"   Retries: {t_['Retries']} OpsDropped: {t_['OpsDropped']} "
            f"Ops Remaining: {t_['Ops Remaining']}",
            f"   Orphan Files Removed: {t_['Orphan Files Removed']} Orphan Directories Removed: "
            f"{t_['Orphan Directories Removed']} Orphan Bytes Removed: {t_['Orphan Bytes Removed']}",
            f"   Bytes In Target Queue: {t_['Bytes In Target Queue']}",
        ]
    s = d["SOURCE"]
    out += [
        f"SOURCE::autoDisConnects : {s['autoDisConnects']} autoReConnects : {s['autoReConnects']}",
        f"   lastFileTouched : {s['lastFileTouched']}",
    ]
    for c in d["CONNECTION"]:
        pct = c["conMirrorPercent"]
        out += [
            f"CONNECTION:: conPeerAddress: {c['conPeerAddress']}",
            f"   connectTime: {c['connectTime']}",
            f"   conState: {c['conState']} conOpsInCmdQueue: {c['conOpsInCmdQueue']} "
            f"conOpsInAckQueue: {c['conOpsInAckQueue']}",
            f"   conOpsInRepQueue: {c['conOpsInRepQueue']} conBytesInRepQueue: {c['conBytesInRepQueue']}",
            f"   conOpsTx: {c['conOpsTx']} conBytesTx: {c['conBytesTx']}",
            f"   conBytesCompressedTx: {c['conBytesCompressedTx']}",
            f"   conResentOpCount: {c['conResentOpCount']} "
            f"conBytesInDiskQueue: {c['conBytesInDiskQueue']}",
            f"   conVanishedResentCount: {c['conVanishedResentCount']} "
            f"conReplacedResentCount: {c['conReplacedResentCount']} "
            f"conRelinkedSentCount: {c['conRelinkedSentCount']}",
            f"   conBandwidthLimit: {c['conBandwidthLimit']} "
            f"conBytesSkipped: {c['conBytesSkipped']}",
            f"   conMirrorPercent: {'' if pct is None else f'{pct:.1f}%'}",
        ]
    return "\n".join(out) + "\n"


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def exposition(svc: Service) -> str:
    """Prometheus text format 0.0.4."""
    d = collect(svc)
    lines: list[str] = []

    def metric(
        name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]
    ) -> None:
        lines.append(f"# HELP dtake_{name} {help_}")
        lines.append(f"# TYPE dtake_{name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            lines.append(f"dtake_{name}{{{lab}}} {value}" if lab else f"dtake_{name} {value}")

    k = d["KERNEL"]
    metric("rep_ops_generated_total", "counter", "RepOpsGenerated", [({}, k["RepOpsGenerated"])])
    metric(
        "mir_bytes_generated_total", "counter", "MirBytesGenerated", [({}, k["MirBytesGenerated"])]
    )
    cl = [
        (dict(id=str(c["id"]), repset=c["repset"], target=c["conPeerAddress"]), c)
        for c in d["CONNECTION"]
    ]
    metric(
        "con_state",
        "gauge",
        "conState (1 active, 2 paused, 4 scheduled, 8 error)",
        [(lb, c["conState"]) for lb, c in cl],
    )
    metric("failed_mirror_total", "counter", "FailedMirrorCount", [({}, k["FailedMirrorCount"])])
    metric("failed_rep_total", "counter", "FailedRepCount", [({}, k["FailedRepCount"])])
    src = d["SOURCE"]
    metric("auto_disconnects_total", "counter", "autoDisConnects", [({}, src["autoDisConnects"])])
    metric("auto_reconnects_total", "counter", "autoReConnects", [({}, src["autoReConnects"])])
    # One series per connection, its value the dtstat field named in HELP.
    for name, kind, field_ in (
        ("con_bytes_tx_total", "counter", "conBytesTx"),
        ("con_bytes_compressed_tx_total", "counter", "conBytesCompressedTx"),
        ("con_resent_ops_total", "counter", "conResentOpCount"),
        ("con_vanished_resent_total", "counter", "conVanishedResentCount"),
        ("con_replaced_resent_total", "counter", "conReplacedResentCount"),
        ("con_relinked_sent_total", "counter", "conRelinkedSentCount"),
        ("con_bytes_in_disk_queue", "gauge", "conBytesInDiskQueue"),
        ("con_ops_tx_total", "counter", "conOpsTx"),
        ("con_bytes_in_rep_queue", "gauge", "conBytesInRepQueue"),
        ("con_ops_in_ack_queue", "gauge", "conOpsInAckQueue"),
        ("con_bytes_skipped_total", "counter", "conBytesSkipped"),
    ):
        metric(name, kind, field_, [(lb, c[field_]) for lb, c in cl])
    metric(
        "target_data_ok",
        "gauge",
        "1 when the target data state is OK",
        [(lb, 1 if c["targetDataState"] == "OK" else 0) for lb, c in cl]
        + [
            ({"target_path": t["TargetPath"], "role": "target"}, 1 if t["DataState"] == "OK" else 0)
            for t in d["TARGET"]
        ],
    )
    tl = [({"source": t["PeerAddress"], "target_path": t["TargetPath"]}, t) for t in d["TARGET"]]
    metric(
        "target_ops_received_total",
        "counter",
        "Ops Received",
        [(lb, t["Ops Received"]) for lb, t in tl],
    )
    metric(
        "target_ops_dropped_total", "counter", "OpsDropped", [(lb, t["OpsDropped"]) for lb, t in tl]
    )
    metric("target_retries_total", "counter", "Retries", [(lb, t["Retries"]) for lb, t in tl])
    metric(
        "target_ops_remaining", "gauge", "Ops Remaining", [(lb, t["Ops Remaining"]) for lb, t in tl]
    )
    metric(
        "orphan_files_removed_total",
        "counter",
        "Orphan Files Removed",
        [({}, sum(t["Orphan Files Removed"] for t in d["TARGET"][:1]))],
    )
    return "\n".join(lines) + "\n"


class MetricsServer:
    """``GET /metrics`` on ``bind:port`` (a daemon thread; off unless configured)."""

    def __init__(self, svc: Service, bind: str, port: int) -> None:
        self.svc = svc
        svc_ref = svc

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404)
                    return
                body = exposition(svc_ref).encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug(format, *args)

        self.httpd = http.server.ThreadingHTTPServer((bind, port), Handler)
        self.httpd.daemon_threads = True

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def start(self) -> None:
        threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
