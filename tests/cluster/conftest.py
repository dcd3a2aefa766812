"""Cluster tests run against a real lab (lab/): see lab/pytest_plugin.py."""

from __future__ import annotations

import sys
from pathlib import Path

# lab/ is a top-level package of the repo, not part of the installed distribution.
_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lab.pytest_plugin import lab_cluster, pytest_sessionfinish  # noqa: E402

__all__ = ["lab_cluster", "pytest_sessionfinish"]
