"""Every path, name and default the lab uses, in one place.

Precedence for each knob: the argument given to :class:`lab.Lab` (or the CLI
option), then the environment variable, then the default here.
"""

from __future__ import annotations

import os
import re
import zlib

__all__ = [
    "DEFAULT_N",
    "DEFAULT_PREFIX",
    "MAX_NODES",
    "NODE_ENV",
    "default_state_dir",
    "default_subnet",
    "validate_prefix",
]

DEFAULT_PREFIX = "dtl"  # env DTAKE_LAB_PREFIX
DEFAULT_N = 3
MAX_NODES = 9
ENV_PREFIX = "DTAKE_LAB_PREFIX"
ENV_STATE_DIR = "DTAKE_LAB_STATE_DIR"  # default /run/dtake-lab-<prefix>
ENV_SUBNET = "DTAKE_LAB_SUBNET"  # default 198.18.<crc32(prefix) % 250 + 1>
TOKEN_MS = 1000  # corosync totem token: fast failure detection for tests
DC_DEADTIME = "2s"  # default 20s would add ~20 s to every cold start

MARKER = ".dtake-lab"  # in the state dir; down deletes only a dir that has it
HOST_NETNS_DIR = "/run/netns"

# The environment of every process the lab starts inside a node: nothing of the
# caller's environment (virtualenv, pytest, CIB_file, ...) leaks into the nodes.
NODE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
NODE_ENV = {"PATH": NODE_PATH, "HOME": "/root", "LANG": "C.UTF-8", "USER": "root"}

# Directories every node has privately: host path -> name of its directory
# under <state>/nodes/<node>/. They start empty (the CIB is seeded) and are
# visible from the host there (see Lab.host_path).
PRIVATE_DIRS = {
    "/etc/dtake": "etc-dtake",
    "/var/lib/pacemaker": "var-lib-pacemaker",
    "/var/lib/corosync": "var-lib-corosync",
    "/var/lib/dtake": "var-lib-dtake",
    "/var/log/pacemaker": "var-log-pacemaker",
    "/var/log/corosync": "var-log-corosync",
    "/var/log/dtake": "var-log-dtake",
    "/usr/lib/ocf/resource.d/dtake": "ocf-dtake",
    "/srv": "srv",
    "/tmp": "tmp",
}
# Trees that get a private copy-on-write overlay (host tree below, node's
# changes in <state>/nodes/<node>/<name>.upper): the node may write anywhere in
# them (dtsetup, groups, ssh keys) and the host never sees it.
# (A tree the host lacks is skipped: the lab never creates mount points on the host.)
OVERLAYS = {
    "/etc": "etc",
    "/var": "var",
    "/opt": "opt",
    "/usr/local": "usr-local",
    "/usr/lib/ocf/resource.d": "ocf",
}

# /run (a fresh tmpfs per node): what Debian's tmpfiles.d would create.
RUN_DIRS = [
    ("/run/lock", "1777"),
    ("/run/sshd", "0755"),
    ("/run/resource-agents", "1755"),
    ("/run/fence-agents", "1755"),
    ("/run/user", "0755"),
    ("/run/sendsigs.omit.d", "0755"),
    ("/run/dtake", "0755"),
    ("/run/dtake-lab", "0755"),  # pid files of the services the lab starts
]

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,9}$")


def validate_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ValueError(f"lab prefix {prefix!r}: use 1-10 of [a-z0-9], starting with a letter")
    return prefix


def default_state_dir(prefix: str) -> str:
    return os.environ.get(ENV_STATE_DIR) or f"/run/dtake-lab-{prefix}"


def default_subnet(prefix: str) -> str:
    """A /24 in RFC 2544's 198.18.0.0/15, distinct per prefix (labs are isolated anyway)."""
    env = os.environ.get(ENV_SUBNET)
    if env:
        return env
    return f"198.18.{zlib.crc32(prefix.encode()) % 250 + 1}.0/24"
