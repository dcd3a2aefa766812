"""dtake lab: a real N-node corosync + pacemaker cluster on one machine, in namespaces.

Library (tests, demo) and command (``python -m lab``); see lab/README.md.
"""

from __future__ import annotations

from .cluster import ClusterStatus, NodeState, ResourceState, parse_crm_mon
from .core import Lab, LabStatus, NodeStatus, Spawned, UpReport
from .errors import LabError, LabTimeout, NodeCommandError, NodeDown, PreflightError

__all__ = [
    "ClusterStatus",
    "Lab",
    "LabError",
    "LabStatus",
    "LabTimeout",
    "NodeCommandError",
    "NodeDown",
    "NodeState",
    "NodeStatus",
    "PreflightError",
    "ResourceState",
    "Spawned",
    "UpReport",
    "parse_crm_mon",
]
