"""Install the agents as ``ocf:dtake:*``: ``python -m resource_agents.install --dest DIR --python PATH``.

Copies the executables and the modules they import into DEST (default
/usr/lib/ocf/resource.d/dtake) and points each Python shebang at PATH by absolute path
(default: this interpreter; DESIGN §6: a ``python3`` found on PATH may be a pyenv shim
costing +80 ms per call). Only the executables get mode 0755: pacemaker lists every
executable file of a provider directory as an agent. dtsetup does the same copy for
installed hosts (dtsetup/steps/agents.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["AGENTS", "LIBRARY", "install", "main"]

HERE = os.path.dirname(os.path.abspath(__file__))
AGENTS = ("ReplicatedDisk", "SourceConnection")
LIBRARY = ("ocfbase.py", "replicated_disk.py", "source_connection.py")
DEFAULT_DEST = "/usr/lib/ocf/resource.d/dtake"


def install(dest: str = DEFAULT_DEST, python: str | None = None) -> list[str]:
    """Write the agents into DEST (atomically per file); returns the paths written."""
    python = os.path.abspath(python or sys.executable)
    os.makedirs(dest, exist_ok=True)
    written = []
    for name in AGENTS + LIBRARY:
        with open(os.path.join(HERE, name), "rb") as fh:
            data = fh.read()
        first, sep, rest = data.partition(b"\n")
        if first.startswith(b"#!") and b"python" in first:
            # -S: no site import (a venv's .pth files, e.g. an editable install's finder,
            # cost ~12 ms per call); the agents need the standard library only.
            data = f"#!{python} -S".encode() + sep + rest
        path = os.path.join(dest, name)
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o755 if name in AGENTS else 0o644)
        os.replace(tmp, path)
        written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m resource_agents.install", description=__doc__)
    ap.add_argument("--dest", default=DEFAULT_DEST, help=f"provider directory ({DEFAULT_DEST})")
    ap.add_argument(
        "--python", default=None, help="interpreter for the shebang (default: this one)"
    )
    args = ap.parse_args(argv)
    for p in install(args.dest, args.python):
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
