"""dtsetup: the DTSetup.ini-compatible declarative installer of dtake.

Layers (as in pcs): ``dtsetup.cli`` parses argv and renders; ``dtsetup.actions`` holds one
function per user action (validate, plan, apply, uninstall, export) returning structured
results; the domain modules (``ini``, ``yamlsrc``, ``model``, ``schema``, ``steps``) know one
thing each. Problems are :class:`dtsetup.reports.Report` values, never prints.
"""

from __future__ import annotations

__all__ = ["__version__"]

__version__ = "0.1.0"
