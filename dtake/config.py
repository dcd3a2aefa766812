"""Service configuration: ``dtake serve --config FILE`` (YAML, schemas/service.schema.json).

Precedence for every key: the file, then the built-in default below. Errors name the
file and the key path, and the service refuses to start rather than guess.
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

from dtake.errors import DtakeError, E
from dtake.port import DEFAULT_PORT  # in a module of its own: dtsetup imports it there

__all__ = [
    "DEFAULT_PORT",
    "QueueConfig",
    "ServiceConfig",
    "load_config",
    "load_schema",
    "split_hostport",
]

SYSTEM_DIRS = (
    "/",
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/run",
    "/var/lib/dtake",
)


def split_hostport(text: str) -> tuple[str, int]:
    """``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` (a bare IPv6 address has no
    port) as ``(host, port)``, the port DEFAULT_PORT when none is given. ValueError,
    saying what is wrong, for an empty host, an unclosed ``[``, anything after ``]``
    but ``:port``, or a port that is not a number from 1 to 65535."""
    host, port = text, ""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ValueError(f"missing ']' in {text!r}")
        if rest and not rest.startswith(":"):
            raise ValueError(f"expected ':PORT' after ']' in {text!r}")
        port = rest[1:] if rest else str(DEFAULT_PORT)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        port = str(DEFAULT_PORT)
    if not host:
        raise ValueError(f"no host in {text!r}")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"bad port {port!r} in {text!r}: a number from 1 to 65535")
    return host, int(port)


@dataclass
class QueueConfig:
    memory_max_mb: float = 128  # QMemoryBufferMax (fractions: tests, small hosts)
    disk_folder: str = "/var/lib/dtake/queue"
    disk_max_mb: float | None = None  # None = UNLIMITED; 0 = memory only, no logs
    disk_free_min_mb: float = 50
    target_memory_max_mb: float = 64  # target queue (dtake.service.targetqueue)


@dataclass
class ServiceConfig:
    port: int = DEFAULT_PORT
    bind: str = "0.0.0.0"
    node_name: str = field(default_factory=socket.gethostname)
    state_dir: str = "/var/lib/dtake"
    control_socket: str = "/run/dtake/dtake.sock"
    auth_key_file: str = "/etc/dtake/authkey"
    admin_group: str = "dtadmin"
    monitor_group: str = "dtmon"
    log_file: str | None = None
    log_level: str = "info"
    allowed_target_paths: list[str] | None = None
    auto_reconnect: bool = True
    auto_remirror: bool = True
    reconnect_interval_s: float = 2.0
    reconnect_retry_limit: int = 0  # failed attempts before giving up (0 = forever)
    auto_remirror_mode: str = "differences"  # mirror run by auto-remirror
    journal_max_paths: int = 100_000  # change journal bound (0: no journals)
    queue: QueueConfig = field(default_factory=QueueConfig)
    source_file: str | None = None
    # Snapshots, orphans, verification log, log rotation, metrics (dtake.service.datafeatures).
    data_safety: dict[str, Any] = field(default_factory=dict)

    def target_path_allowed(self, path: str) -> bool:
        real = os.path.normpath(path)
        if self.allowed_target_paths is not None:
            return any(
                real == p.rstrip("/") or real.startswith(p.rstrip("/") + "/")
                for p in self.allowed_target_paths
            )
        state = os.path.normpath(self.state_dir)
        if real == state or real.startswith(state + "/"):
            return False
        return real not in SYSTEM_DIRS


def load_schema(name: str) -> dict[str, Any]:
    data = resources.files("dtake").joinpath("schemas", name).read_text(encoding="utf-8")
    result: dict[str, Any] = json.loads(data)
    return result


def load_config(path: str) -> ServiceConfig:
    try:
        with open(path, encoding="utf-8") as fh:
            raw = yaml.safe_load(fh) or {}
    except OSError as exc:
        raise DtakeError(
            E.INVALID_PARAMETER, f"{path}: cannot read config: {exc.strerror}"
        ) from exc
    except yaml.YAMLError as exc:
        raise DtakeError(E.INVALID_PARAMETER, f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise DtakeError(E.INVALID_PARAMETER, f"{path}: the top level must be a mapping")
    import jsonschema  # lazy: +74 ms, only at service start

    validator = jsonschema.Draft202012Validator(load_schema("service.schema.json"))
    problems = sorted(validator.iter_errors(raw), key=lambda e: list(e.absolute_path))
    if problems:
        lines = [
            f"{path}: {'.'.join(str(p) for p in e.absolute_path) or '(top)'}: {e.message}"
            for e in problems
        ]
        raise DtakeError(E.INVALID_PARAMETER, "invalid service config:\n  " + "\n  ".join(lines))
    q = dict(raw.get("queue") or {})
    state_dir = raw.get("state_dir", "/var/lib/dtake")
    disk_max = q.get("disk_max_mb", "unlimited")
    queue = QueueConfig(
        memory_max_mb=float(q.get("memory_max_mb", 128)),
        disk_folder=str(q.get("disk_folder", os.path.join(state_dir, "queue"))),
        disk_max_mb=None if isinstance(disk_max, str) else float(disk_max),
        disk_free_min_mb=float(q.get("disk_free_min_mb", 50)),
        target_memory_max_mb=float(q.get("target_memory_max_mb", 64)),
    )
    cfg = ServiceConfig(queue=queue, source_file=path)
    for key in (
        "port",
        "bind",
        "node_name",
        "state_dir",
        "control_socket",
        "auth_key_file",
        "admin_group",
        "monitor_group",
        "log_file",
        "log_level",
        "allowed_target_paths",
        "auto_reconnect",
        "auto_remirror",
        "reconnect_interval_s",
        "reconnect_retry_limit",
        "auto_remirror_mode",
        "journal_max_paths",
        "data_safety",
    ):
        if key in raw:
            setattr(cfg, key, raw[key])
    return cfg
