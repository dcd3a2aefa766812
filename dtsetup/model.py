"""From a raw document to typed, validated :class:`Settings` for one host.

Order of work, so that one run reports everything: type every entry of every section
(keeping the raw text for messages), map Windows paths, validate the typed document with
the schema, then pick the host's section [seed L562: ``[MachineName]`` if it matches the
host name case-sensitively, else ``[Config]``] and fill blanks with the built-in defaults,
warning about each one [seed L638].
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtake.port import DEFAULT_PORT  # not dtake.config: it imports PyYAML
from dtsetup import paths
from dtsetup.reports import Code, Report, Severity, error, has_errors, warning
from dtsetup.schema import KEYS, SECRET_KEYS, iter_issues  # KEYS: re-exported, export order
from dtsetup.source import RawDocument, RawEntry, load_document

__all__ = [
    "DEFAULTS",
    "KEYS",
    "LoadResult",
    "Settings",
    "load",
    "select_section",
    "settings_from_typed",
    "type_document",
]

CONFIG_SECTION = "Config"

# Built-in defaults: the seed's "hard-coded default" [L638] made Linux-shaped.
DEFAULTS: dict[str, Any] = {
    "DTSETUPTYPE": "DTNT",
    "DOUBLETAKEFOLDER": paths.DEFAULT_INSTALL_FOLDER,
    "QMEMORYBUFFERMAX": 512,  # "128 or 512 MB ... depending on your operating system" [L4950]
    "DISKQUEUEFOLDER": paths.DEFAULT_QUEUE_FOLDER,
    "DISKQUEUEMAXSIZE": "UNLIMITED",  # "By default, the disk space is set to Unlimited" [L529]
    "DISKFREESPACEMIN": 50,  # the sample's value [L578]; 50 MB per EXT-B (not from seed)
    "DTSERVICESTARTUP": True,  # the sample's value [L580]
    "PORT": DEFAULT_PORT,  # [L1325, L1679]
    "SET_FWPORT": True,  # the sample's value [L584]
}

EXPECTED: dict[str, str] = {
    "DTSETUPTYPE": "DTNT, DTSO or DTCO",
    "DTACTIVATIONCODE": "24 alphanumeric characters per code, codes separated by ';'",
    "DOUBLETAKEFOLDER": "an absolute path such as /opt/dtake",
    "QMEMORYBUFFERMAX": "a whole number of MB, at least 1",
    "DISKQUEUEFOLDER": "an absolute path such as /var/lib/dtake/queue",
    "DISKQUEUEMAXSIZE": "a whole number of MB or UNLIMITED",
    "DISKFREESPACEMIN": "a whole number of MB, 0 or more",
    "DTSERVICESTARTUP": "Y or 1 (start automatically), N or 0 (do not)",
    "PORT": "a whole number from 1024 to 65535",
    "SET_FWPORT": "Y or 1 (open the firewall port), N or 0 (do not)",
}

PATH_KEYS = frozenset({"DOUBLETAKEFOLDER", "DISKQUEUEFOLDER"})
_INT = re.compile(r"^[+-]?[0-9]+$")
_WINDOWS_PATH = re.compile(r"^[A-Za-z]:|\\")


def _as_int(raw: str) -> Any:
    text = raw.strip()
    return int(text) if _INT.match(text) and len(text) < 20 else raw


def _as_yn(raw: str) -> Any:
    return {"Y": True, "1": True, "N": False, "0": False}.get(raw.strip().upper(), raw)


def _as_disk_max(raw: str) -> Any:
    return "UNLIMITED" if raw.strip().upper() == "UNLIMITED" else _as_int(raw)


def _as_codes(raw: str) -> Any:
    return [code.strip() for code in raw.split(";") if code.strip()]


_TYPERS: dict[str, Callable[[str], Any]] = {
    "DTSETUPTYPE": lambda raw: raw.strip().upper(),
    "DTACTIVATIONCODE": _as_codes,
    "DOUBLETAKEFOLDER": lambda raw: raw,
    "QMEMORYBUFFERMAX": _as_int,
    "DISKQUEUEFOLDER": lambda raw: raw,
    "DISKQUEUEMAXSIZE": _as_disk_max,
    "DISKFREESPACEMIN": _as_int,
    "DTSERVICESTARTUP": _as_yn,
    "PORT": _as_int,
    "SET_FWPORT": _as_yn,
}


@dataclass(frozen=True, slots=True)
class Settings:
    """The converged state for one host, in the DTSetup vocabulary."""

    section: str
    setup_type: str
    activation_codes: tuple[str, ...] = field(repr=False)
    install_folder: str
    memory_buffer_max_mb: int
    disk_queue_folder: str
    disk_queue_max_mb: int | None  # None = UNLIMITED
    disk_free_min_mb: int
    service_startup: bool
    port: int
    set_fw_port: bool

    @property
    def server(self) -> bool:
        """DTCO installs only the client: no service, no firewall port [seed L646-648]."""
        return self.setup_type != "DTCO"

    def to_keys(self) -> dict[str, Any]:
        """Back to DTSetup keys (typed), the form export writes."""
        return {
            "DTSETUPTYPE": self.setup_type,
            "DTACTIVATIONCODE": list(self.activation_codes),
            "DOUBLETAKEFOLDER": self.install_folder,
            "QMEMORYBUFFERMAX": self.memory_buffer_max_mb,
            "DISKQUEUEFOLDER": self.disk_queue_folder,
            "DISKQUEUEMAXSIZE": (
                "UNLIMITED" if self.disk_queue_max_mb is None else self.disk_queue_max_mb
            ),
            "DISKFREESPACEMIN": self.disk_free_min_mb,
            "DTSERVICESTARTUP": self.service_startup,
            "PORT": self.port,
            "SET_FWPORT": self.set_fw_port,
        }


@dataclass(slots=True)
class LoadResult:
    document: RawDocument
    typed: dict[str, dict[str, Any]]
    reports: list[Report]
    settings: Settings | None = None  # None when invalid or when no host was asked for

    @property
    def ok(self) -> bool:
        return not has_errors(self.reports)


def _where(doc: RawDocument, section: str, entry: RawEntry | None) -> dict[str, Any]:
    line = entry.line if entry is not None else doc.sections[section].line
    return {"file": doc.file, "line": line, "section": section}


def type_document(
    doc: RawDocument, *, strict: bool
) -> tuple[dict[str, dict[str, Any]], list[Report]]:
    """Typed form of every section (blank entries left out), plus blank/path findings."""
    typed: dict[str, dict[str, Any]] = {}
    reports: list[Report] = []
    for name, section in doc.sections.items():
        out: dict[str, Any] = {}
        for key, entry in section.entries.items():
            where = _where(doc, name, entry) | {"key": key}
            typer = _TYPERS.get(key)
            if typer is None:
                out[key] = entry.value  # left for the schema to report as unknown
                continue
            if entry.value is None or (key == "DTACTIVATIONCODE" and not _as_codes(entry.value)):
                if key in DEFAULTS:
                    reports.append(
                        warning(
                            Code.BLANK_VALUE,
                            f"{entry.written_key} is blank; using the built-in default "
                            f"{_show(key, DEFAULTS[key])} (the seed: do not leave any "
                            "parameter blank)",
                            **where,
                        )
                    )
                continue
            value = entry.value
            if key in PATH_KEYS and _WINDOWS_PATH.search(value):
                default = DEFAULTS[key]
                reports.append(
                    Report(
                        code=Code.WINDOWS_PATH,
                        message=(
                            f"{entry.written_key}={value!r} is a Windows path"
                            + ("" if strict else f"; using the Linux default {default}")
                        ),
                        severity=Severity.ERROR if strict else Severity.WARNING,
                        **where,
                    )
                )
                continue
            out[key] = typer(value)
        typed[name] = out
    return typed, reports


def _show(key: str, value: Any) -> str:
    if key in SECRET_KEYS:
        return "<redacted>"
    if isinstance(value, bool):
        return "Y" if value else "N"
    return str(value)


def _schema_reports(doc: RawDocument, typed: dict[str, dict[str, Any]]) -> list[Report]:
    reports: list[Report] = []
    seen: set[tuple[str | None, str | None, str]] = set()
    for issue in iter_issues(typed):
        ident = (issue.section, issue.key, issue.kind)
        if ident in seen:  # anyOf and friends can report one value several times
            continue
        seen.add(ident)
        section = issue.section
        if section is None or section not in doc.sections:
            reports.append(error(Code.NO_SECTIONS, "the document has no sections", file=doc.file))
            continue
        entry = doc.sections[section].entries.get(issue.key) if issue.key else None
        where = _where(doc, section, entry) | {"key": issue.key}
        if issue.kind == "unknown_key":
            written = entry.written_key if entry else issue.key
            reports.append(
                error(
                    Code.UNKNOWN_KEY,
                    f"unknown key {written}; known keys: {', '.join(KEYS)}",
                    **where,
                )
            )
        elif issue.kind == "required":
            reports.append(
                error(
                    Code.MISSING_ACTIVATION_CODE,
                    "DTACTIVATIONCODE is required unless DTSETUPTYPE=DTCO",
                    **where,
                )
            )
        elif issue.kind == "value" and issue.key is not None:
            written = entry.written_key if entry else issue.key
            shown = "<redacted>" if issue.key in SECRET_KEYS else repr(entry.value if entry else "")
            reports.append(
                error(
                    Code.BAD_VALUE,
                    f"{written}={shown} is not valid: expected {EXPECTED.get(issue.key, '?')}",
                    **where,
                )
            )
        else:
            reports.append(error(Code.YAML_SHAPE, "invalid document structure", **where))
    return reports


def select_section(doc: RawDocument, host: str) -> str | None:
    """The section for ``host``: its own (case-sensitive; the short name of an FQDN also
    matches, as Windows machine names are short), else Config, else None."""
    if host in doc.sections:
        return host
    short = host.split(".", 1)[0]
    if short in doc.sections:
        return short
    return CONFIG_SECTION if CONFIG_SECTION in doc.sections else None


def settings_from_typed(
    doc: RawDocument, typed: dict[str, dict[str, Any]], section: str
) -> tuple[Settings, list[Report]]:
    values = dict(typed[section])
    reports: list[Report] = []
    raw = doc.sections[section]
    for key in KEYS:
        if key not in values and key not in raw.entries and key in DEFAULTS:
            reports.append(
                warning(
                    Code.MISSING_KEY,
                    f"{key} is not set in [{section}]; using the built-in default "
                    f"{_show(key, DEFAULTS[key])}",
                    file=doc.file,
                    line=raw.line,
                    section=section,
                    key=key,
                )
            )
        values.setdefault(key, DEFAULTS.get(key))
    if values["DTSETUPTYPE"] == "DTCO" and "DTSERVICESTARTUP" in raw.entries:
        reports.append(
            Report(
                code=Code.SERVICE_STARTUP_IGNORED,
                message="DTSERVICESTARTUP is not applied when DTSETUPTYPE is DTCO [seed L664]",
                severity=Severity.INFO,
                file=doc.file,
                line=raw.entries["DTSERVICESTARTUP"].line,
                section=section,
                key="DTSERVICESTARTUP",
            )
        )
    disk_max = values["DISKQUEUEMAXSIZE"]
    settings = Settings(
        section=section,
        setup_type=values["DTSETUPTYPE"],
        activation_codes=tuple(values.get("DTACTIVATIONCODE") or ()),
        install_folder=values["DOUBLETAKEFOLDER"],
        memory_buffer_max_mb=values["QMEMORYBUFFERMAX"],
        disk_queue_folder=values["DISKQUEUEFOLDER"],
        disk_queue_max_mb=None if disk_max == "UNLIMITED" else int(disk_max),
        disk_free_min_mb=values["DISKFREESPACEMIN"],
        service_startup=values["DTSERVICESTARTUP"],
        port=values["PORT"],
        set_fw_port=values["SET_FWPORT"],
    )
    return settings, reports


def load(
    path: Path, *, host: str | None, strict: bool = False, text: str | None = None
) -> LoadResult:
    """Read, type and validate ``path``; with ``host``, also build that host's Settings."""
    doc, reports = load_document(path, text=text)
    typed, typing_reports = type_document(doc, strict=strict)
    reports.extend(typing_reports)
    if doc.sections:
        # A key the reader already rejected (a YAML list value) is not also "missing".
        rejected = {(r.section, r.key) for r in reports if r.is_error and r.key}
        reports.extend(
            r
            for r in _schema_reports(doc, typed)
            if not (r.code is Code.MISSING_ACTIVATION_CODE and (r.section, r.key) in rejected)
        )
    result = LoadResult(document=doc, typed=typed, reports=reports)
    if host is None or not result.ok:
        return result
    section = select_section(doc, host)
    if section is None:
        reports.append(
            error(
                Code.NO_SECTION_FOR_HOST,
                f"no [{host}] section and no [Config] section",
                file=doc.file,
            )
        )
        return result
    result.settings, more = settings_from_typed(doc, typed, section)
    reports.extend(more)
    return result
