"""Change capture: ordered inotify events with overflow detection (DESIGN §2)."""

from __future__ import annotations

from dtake.capture.inotify import WATCH_MASK, EventKind, FsEvent, InotifyCapture

__all__ = ["WATCH_MASK", "EventKind", "FsEvent", "InotifyCapture"]
