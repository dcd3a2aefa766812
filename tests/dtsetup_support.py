"""Test data shared by the dtsetup unit and integration tests (their conftests)."""

from __future__ import annotations

from collections.abc import Mapping

CODE = "ABCDEFGHJKLMNPQRSTUVWXY3"  # 24 alphanumerics, a made-up activation code

# A complete valid section: every key, the seed sample's values [L566-584], Linux paths.
FULL_KEYS: dict[str, str] = {
    "DTSETUPTYPE": "DTNT",
    "DTACTIVATIONCODE": CODE,
    "DOUBLETAKEFOLDER": '"/opt/dtake"',
    "QMEMORYBUFFERMAX": "128",
    "DISKQUEUEFOLDER": '"/var/lib/dtake/queue"',
    "DISKQUEUEMAXSIZE": "UNLIMITED",
    "DISKFREESPACEMIN": "50",
    "DTSERVICESTARTUP": "1",
    "PORT": "6320",
    "SET_FWPORT": "Y",
}


def ini_text(section: str, keys: Mapping[str, str]) -> str:
    """A DTSetup.ini of one ``[section]`` holding ``keys`` (KEY=value lines, in order)."""
    return f"[{section}]\n" + "".join(f"{k}={v}\n" for k, v in keys.items())
