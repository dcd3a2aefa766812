"""Rendering of the files dtsetup writes: the service config and the export forms.

Everything here is deterministic (same settings -> same bytes), which is what makes a
second apply report nothing changed.
"""

from __future__ import annotations

import re
from typing import Any

from dtsetup import paths
from dtsetup.model import KEYS, Settings
from dtsetup.schema import SECRET_KEYS

__all__ = ["export_ini", "export_yaml", "service_config", "service_config_text"]

HEADER = "# Managed by dtsetup: changes here are overwritten by the next `dtsetup apply`.\n"


def service_config(settings: Settings) -> dict[str, Any]:
    """The service config contract (issue 2 / DESIGN §2): DTSetup keys -> dtake.yaml."""
    return {
        "bind": "0.0.0.0",
        "port": settings.port,
        "state_dir": paths.STATE_DIR,
        "control_socket": paths.CONTROL_SOCKET,
        "auth_key_file": paths.AUTH_KEY,
        "admin_group": paths.ADMIN_GROUP,
        "monitor_group": paths.MONITOR_GROUP,
        "queue": {
            "memory_max_mb": settings.memory_buffer_max_mb,
            "disk_folder": settings.disk_queue_folder,
            "disk_max_mb": (
                "unlimited" if settings.disk_queue_max_mb is None else settings.disk_queue_max_mb
            ),
            "disk_free_min_mb": settings.disk_free_min_mb,
        },
    }


# Strings YAML writes as they are (no quotes, never read back as a number, bool or null):
# absolute paths of plain characters and the fixed words of the config.
_PLAIN = re.compile(r"/[A-Za-z0-9_./-]*|0\.0\.0\.0|unlimited|dtadmin|dtmon")


def _plain_block(mapping: dict[str, Any], indent: str = "") -> str | None:
    """``mapping`` as yaml.safe_dump(sort_keys=False) writes it, when every value is an
    int or a :data:`_PLAIN` string; None otherwise (the caller then uses PyYAML)."""
    out: list[str] = []
    for key, value in mapping.items():
        if isinstance(value, dict):
            inner = _plain_block(value, indent + "  ")
            if inner is None:
                return None
            out.append(f"{indent}{key}:\n{inner}")
            continue
        number = isinstance(value, int) and not isinstance(value, bool)
        if not (number or (isinstance(value, str) and _PLAIN.fullmatch(value))):
            return None
        out.append(f"{indent}{key}: {value}\n")
    return "".join(out)


def service_config_text(settings: Settings) -> str:
    """The config's bytes. The usual values are written directly (the same bytes PyYAML
    writes, a unit test compares them): a no-op apply need not import PyYAML."""
    config = service_config(settings)
    body = _plain_block(config)
    if body is None:
        import yaml

        body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return HEADER + body


def _ini_value(key: str, value: Any) -> str:
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, list):
        return ";".join(value)
    if key in ("DOUBLETAKEFOLDER", "DISKQUEUEFOLDER"):
        return f'"{value}"'  # paths quoted, as in the seed's sample [L570]
    return str(value)


def export_ini(section: str, keys: dict[str, Any], *, include_secrets: bool) -> str:
    lines = [f"[{section}]"]
    for key in KEYS:
        if key not in keys:
            continue
        if key in SECRET_KEYS and not include_secrets:
            lines.append(f"; {key} redacted (export --include-secrets --output FILE writes it)")
            continue
        lines.append(f"{key}={_ini_value(key, keys[key])}")
    return "\n".join(lines) + "\n"


def export_yaml(section: str, keys: dict[str, Any], *, include_secrets: bool) -> str:
    import yaml

    body: dict[str, Any] = {}
    for key in KEYS:
        if key not in keys:
            continue
        if key in SECRET_KEYS and not include_secrets:
            continue
        value = keys[key]
        if isinstance(value, bool):
            value = "Y" if value else "N"
        elif isinstance(value, list):
            value = ";".join(value)
        body[key] = value
    text = yaml.safe_dump({section: body}, sort_keys=False, default_flow_style=False)
    if not include_secrets and any(k in SECRET_KEYS for k in keys):
        text = (
            "# DTACTIVATIONCODE redacted (export --include-secrets --output FILE writes it)\n"
            + text
        )
    return text
