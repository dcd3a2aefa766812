"""What the infra suites share (constants, the ``stat`` record): a module of its own so
test modules import it by a name no other conftest.py shadows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["AGENTS", "AGENT_DIR", "RECORD", "Stat", "config_paths"]

AGENTS = ("SourceConnection", "ReplicatedDisk")
AGENT_DIR = "/usr/lib/ocf/resource.d/dtake"
RECORD = "/etc/dtake/dtsetup.json"


@dataclass(frozen=True)
class Stat:
    mode: int
    user: str
    group: str
    kind: str  # stat %F: regular file, directory, socket...


def config_paths(cfg: dict[str, Any]) -> dict[str, str]:
    """The paths of the service config, with the service's defaults."""
    return {
        "auth_key_file": str(cfg.get("auth_key_file", "/etc/dtake/authkey")),
        "state_dir": str(cfg.get("state_dir", "/var/lib/dtake")),
        "control_socket": str(cfg.get("control_socket", "/run/dtake/dtake.sock")),
    }
