"""Statistics with the seed's DTStat names (seed-monitoring.md §5.3-§5.4) and their
Prometheus text exposition (``/metrics``, off by default: ``data_safety.metrics.port``).

Only the fields that mean something on Linux are produced: KERNEL (SourceState,
TargetState, Start Time, Rep/Mir ops and bytes, failures), TARGET (one block per
source: ops received, retries/drops, orphans removed, queue bytes), SOURCE (auto
(dis)connects, last file touched) and CONNECTION (one block per connection: conState,
queues, bytes transmitted, mirror progress). The exposition format is written by hand
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


def collect(svc: Service) -> dict[str, Any]:
    st = svc.status()
    feat = svc.features.get("dtake.service.datafeatures")
    orphans = dict(getattr(feat, "orphan_stats", {}) or {})
    conns = st["connections"]
    kernel = {
        "SourceState": 2 if conns else 1,  # 2: running with change capture
        "TargetState": 1,
        "StartTime": time.ctime(svc.started),
        "RepOpsGenerated": sum(c["stats"].get("replication_ops", 0) for c in conns),
        "RepBytesGenerated": sum(
            c["stats"].get("bytes_sent", 0) - c["stats"].get("mirror_bytes_sent", 0) for c in conns
        ),
        "MirOpsGenerated": sum(c["stats"].get("files_sent", 0) for c in conns),
        "MirBytesGenerated": sum(c["stats"].get("mirror_bytes_sent", 0) for c in conns),
        "FailedMirrorCount": 0,
        "FailedRepCount": sum(c["stats"].get("read_failures", 0) for c in conns),
    }
    targets = [
        {
            "PeerAddress": t["source_node"],
            "TargetPath": t["target_path"],
            "Ops Received": t.get("ops_applied", 0),
            "Retries": 0,
            "OpsDropped": t.get("failures", 0),
            "Orphan Files Removed": orphans.get("files", 0),
            "Orphan Directories Removed": orphans.get("dirs", 0),
            "Orphan Bytes Removed": orphans.get("bytes", 0),
            "Bytes Applied": t.get("bytes_applied", 0),
            "DataState": t.get("data_state", ""),
        }
        for t in st["targets"]
    ]
    source = {
        "autoDisConnects": sum(c["stats"].get("reconnects", 0) for c in conns),
        "autoReConnects": sum(c["stats"].get("reconnects", 0) for c in conns),
        "lastFileTouched": "",
    }
    connections = [
        {
            "id": c["id"],
            "repset": c["repset"],
            "conPeerAddress": c["target"],
            "connectTime": time.ctime(c["connected_since"]) if c["connected_since"] else "",
            "conState": CON_STATE.get(c["state"], 0),
            "conOpsInAckQueue": c["unacked_ops"],
            "conOpsInRepQueue": c["queued_items"],
            "conBytesInRepQueue": c["queued_bytes"],
            "conOpsTx": c["stats"].get("ops_sent", 0),
            "conBytesTx": c["stats"].get("bytes_sent", 0),
            "conBytesCompressedTx": c["stats"].get(
                "bytes_compressed", c["stats"].get("bytes_sent", 0)
            ),
            "conResentOpCount": 0,
            "conBytesSkipped": c["stats"].get("mirror_bytes_skipped", 0),
            "conMirrorPercent": _percent(c["mirror_status"]),
            "targetDataState": c["target_data_state"],
            "mirrorStatus": c["mirror_status"],
            "replicationStatus": c["replication_status"],
        }
        for c in conns
    ]
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
            f"   Retries: {t_['Retries']} OpsDropped: {t_['OpsDropped']}",
            f"   Orphan Files Removed: {t_['Orphan Files Removed']} Orphan Directories Removed: "
            f"{t_['Orphan Directories Removed']} Orphan Bytes Removed: {t_['Orphan Bytes Removed']}",
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
            f"   conState: {c['conState']} conOpsInAckQueue: {c['conOpsInAckQueue']}",
            f"   conOpsInRepQueue: {c['conOpsInRepQueue']} conBytesInRepQueue: {c['conBytesInRepQueue']}",
            f"   conOpsTx: {c['conOpsTx']} conBytesTx: {c['conBytesTx']}",
            f"   conBytesCompressedTx: {c['conBytesCompressedTx']}",
            f"   conResentOpCount: {c['conResentOpCount']} conBytesSkipped: {c['conBytesSkipped']}",
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
    metric("con_bytes_tx_total", "counter", "conBytesTx", [(lb, c["conBytesTx"]) for lb, c in cl])
    metric("con_ops_tx_total", "counter", "conOpsTx", [(lb, c["conOpsTx"]) for lb, c in cl])
    metric(
        "con_bytes_in_rep_queue",
        "gauge",
        "conBytesInRepQueue",
        [(lb, c["conBytesInRepQueue"]) for lb, c in cl],
    )
    metric(
        "con_ops_in_ack_queue",
        "gauge",
        "conOpsInAckQueue",
        [(lb, c["conOpsInAckQueue"]) for lb, c in cl],
    )
    metric(
        "con_bytes_skipped_total",
        "counter",
        "conBytesSkipped",
        [(lb, c["conBytesSkipped"]) for lb, c in cl],
    )
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
