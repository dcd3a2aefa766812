"""The dtake service's default TCP port, for all traffic between servers and clients
[L1325, L1679]: the one place the number is written.

``dtake.config.DEFAULT_PORT`` is the name to use; it is this one. It lives in a module
of its own so that dtsetup can use it without dtake.config's imports (PyYAML,
importlib.resources): a dtsetup run that needs no YAML does not load PyYAML. The OCF
agents cannot import dtake at all (copied standalone, run with ``python -S``, stdlib
only, a thin monitor path): resource_agents/ocfbase.py holds a copy, which
tests/unit/test_config.py keeps equal to this one.
"""

__all__ = ["DEFAULT_PORT"]

DEFAULT_PORT = 6320
