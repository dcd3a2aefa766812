"""Every system path dtsetup touches, in one place (as pcs' settings module).

Paths are absolute as seen on the installed host; :func:`under` places them beneath an
alternative root (``--root DIR``).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["under"]

DEFAULT_INSTALL_FOLDER = "/opt/dtake"
DEFAULT_QUEUE_FOLDER = "/var/lib/dtake/queue"

ETC_DIR = "/etc/dtake"
SERVICE_CONFIG = "/etc/dtake/dtake.yaml"
AUTH_KEY = "/etc/dtake/authkey"
RECORD = "/etc/dtake/dtsetup.json"  # settings applied + what was installed; mode 0600
STATE_DIR = "/var/lib/dtake"
RUN_DIR = "/run/dtake"
CONTROL_SOCKET = "/run/dtake/dtake.sock"
PIDFILE = "/run/dtake/dtake.pid"
SUPERVISOR_LOG_DIR = "/var/log/dtake"
SUPERVISOR_LOG = "/var/log/dtake/supervisor.log"
OCF_DIR = "/usr/lib/ocf/resource.d/dtake"
SYSTEMD_UNIT = "/etc/systemd/system/dtake.service"
SYSTEMD_WANTS = "/etc/systemd/system/multi-user.target.wants/dtake.service"
SUPERVISOR_DEFAULTS = "/etc/default/dtake"
ETC_GROUP = "/etc/group"
SYSTEMD_RUNNING_MARK = "/run/systemd/system"  # sd_booted(3)

ADMIN_GROUP = "dtadmin"  # "Double-Take Admin"
MONITOR_GROUP = "dtmon"  # "Double-Take Monitors"
UNIT_NAME = "dtake.service"
NFT_TABLE = "dtake"  # table inet dtake


def under(root: Path, path: str) -> Path:
    """``path`` (absolute on the target host) placed beneath ``root``."""
    return root / path.lstrip("/")
