"""Property-based tests of DTSetup input (INI and YAML) with hypothesis, beside the seeded
mutator of test_dtsetup_fuzz.py:

* any text or bytes: reading never raises, and every error is located (the file; a line
  within the file unless the problem is the whole file; section and key for key-level
  codes), with a code from the documented set;
* a generated valid document (any key subset and spelling, quotes, comments, blank and
  NBSP lines, CRLF, BOM; YAML the same) is valid, and the host gets exactly the values
  written, defaults for the rest;
* the same document with one fault injected reports exactly that fault: one error, with
  its code, line, section and key;
* invalid input changes nothing: apply runs no command and writes nothing.
"""

from __future__ import annotations

import codecs
import string
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from dtsetup import actions, model, render
from dtsetup.reports import Code
from dtsetup.runner import ScriptedRunner

SETTINGS = settings(
    max_examples=150,
    deadline=None,  # a loaded CI machine; timing is for bench/, not tests
    database=None,  # no .hypothesis/ directory in the tree
    suppress_health_check=[HealthCheck.too_slow],
)
WHOLE_FILE = {Code.NO_SECTIONS, Code.NO_SECTION_FOR_HOST, Code.FILE_UNREADABLE}
KEYED = {
    Code.UNKNOWN_KEY,
    Code.DUPLICATE_KEY,
    Code.BAD_VALUE,
    Code.BLANK_VALUE,
    Code.WINDOWS_PATH,
    Code.MISSING_KEY,
    Code.MISSING_ACTIVATION_CODE,
}
ALNUM = string.ascii_letters + string.digits


# -- valid values, as written and as typed ------------------------------------------------


def _yn() -> st.SearchStrategy[tuple[str, Any]]:
    return st.sampled_from(["Y", "y", "1", "N", "n", "0"]).map(lambda w: (w, w in "Yy1"))


def _int(lo: int, hi: int) -> st.SearchStrategy[tuple[str, Any]]:
    return st.integers(lo, hi).map(lambda n: (str(n), n))


_SEGMENT = st.text(string.ascii_lowercase + string.digits + "_-", min_size=1, max_size=8)
_PATH = st.lists(_SEGMENT, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
_CODE = st.text(ALNUM, min_size=24, max_size=24)

VALID: dict[str, st.SearchStrategy[tuple[str, Any]]] = {
    "DTSETUPTYPE": st.sampled_from(["DTNT", "DTSO", "dtnt", "DtSo"]).map(lambda w: (w, w.upper())),
    "DTACTIVATIONCODE": st.lists(_CODE, min_size=1, max_size=3).map(
        lambda codes: (";".join(codes), codes)
    ),
    "DOUBLETAKEFOLDER": _PATH.map(lambda p: (p, p)),
    "QMEMORYBUFFERMAX": _int(1, 10**6),
    "DISKQUEUEFOLDER": _PATH.map(lambda p: (p, p)),
    "DISKQUEUEMAXSIZE": st.one_of(
        _int(0, 10**9), st.sampled_from(["UNLIMITED", "unlimited"]).map(lambda w: (w, "UNLIMITED"))
    ),
    "DISKFREESPACEMIN": _int(0, 10**6),
    "DTSERVICESTARTUP": _yn(),
    "PORT": _int(1024, 65535),
    "SET_FWPORT": _yn(),
}

# One invalid value per key (the code each must give: BAD_VALUE).
INVALID: dict[str, st.SearchStrategy[str]] = {
    "DTSETUPTYPE": st.sampled_from(["DTXX", "server", "DT NT"]),
    "DTACTIVATIONCODE": st.one_of(
        st.text(ALNUM, min_size=1, max_size=23), st.text(ALNUM, min_size=25, max_size=30)
    ),
    "DOUBLETAKEFOLDER": st.sampled_from(["opt/dtake", "/opt/../etc", "relative", "/"]),
    "QMEMORYBUFFERMAX": st.sampled_from(["0", "-5", "lots", "12.5"]),
    "DISKQUEUEFOLDER": st.sampled_from(["queue", "/var/lib/..", "./q"]),
    "DISKQUEUEMAXSIZE": st.sampled_from(["-1", "UNLIMITEDX", "big"]),
    "DISKFREESPACEMIN": st.sampled_from(["-1", "x"]),
    "DTSERVICESTARTUP": st.sampled_from(["maybe", "2", "yes please"]),
    "PORT": st.one_of(st.integers(0, 1023), st.integers(65536, 10**6)).map(str),
    "SET_FWPORT": st.sampled_from(["T", "open", "-1"]),
}


def _spelling(key: str) -> st.SearchStrategy[str]:
    """Keys are case-insensitive: any mix of cases."""
    return st.lists(st.booleans(), min_size=len(key), max_size=len(key)).map(
        lambda flips: "".join(c.lower() if f else c for c, f in zip(key, flips))
    )


_NAME = st.text(ALNUM + "-_.", min_size=1, max_size=12)


@dataclass
class Entry:
    key: str
    written: str
    raw: str
    typed: Any
    line: int = 0


@dataclass
class Section:
    name: str
    entries: list[Entry] = field(default_factory=list)
    line: int = 0


@st.composite
def documents(draw: st.DrawFn) -> list[Section]:
    names = draw(
        st.lists(
            st.one_of(st.just("Config"), st.just("Alpha"), st.just("alpha"), _NAME),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    sections = []
    for name in names:
        keys = draw(st.lists(st.sampled_from(model.KEYS), unique=True, max_size=10))
        if "DTACTIVATIONCODE" not in keys:  # required (no DTCO generated)
            keys.append("DTACTIVATIONCODE")
        keys = draw(st.permutations(keys))
        entries = []
        for key in keys:
            raw, typed = draw(VALID[key])
            entries.append(Entry(key, draw(_spelling(key)), raw, typed))
        sections.append(Section(name, entries))
    return sections


# -- INI rendering with line tracking -------------------------------------------------------

_FILLER = st.sampled_from(["", "   ", "\u00a0", "; a comment", "# another", "\t"])


@dataclass
class Rendered:
    lines: list[str]
    sections: list[Section]


@st.composite
def ini_documents(draw: st.DrawFn) -> Rendered:
    sections = draw(documents())
    lines: list[str] = []
    for section in sections:
        lines += draw(st.lists(_FILLER, max_size=2))
        lines.append(f"[{section.name}]")
        section.line = len(lines)
        for entry in section.entries:
            lines += draw(st.lists(_FILLER, max_size=1))
            quote = '"' if draw(st.booleans()) else ""
            pad = draw(st.sampled_from(["", " ", "  "]))
            lines.append(f"{entry.written}{pad}={pad}{quote}{entry.raw}{quote}")
            entry.line = len(lines)
    return Rendered(lines, sections)


def _write(directory: Path, lines: list[str], *, name: str, crlf: bool, bom: bool) -> Path:
    path = directory / name
    text = ("\r\n" if crlf else "\n").join(lines) + "\n"
    path.write_bytes(text.encode("utf-8-sig" if bom else "utf-8"))
    return path


def _expected(section: Section) -> dict[str, Any]:
    values = dict(model.DEFAULTS) | {e.key: e.typed for e in section.entries}
    return values


def _check_located(result: model.LoadResult, path: Path, nlines: int) -> None:
    codes = set(Code)
    for report in result.reports:
        assert report.code in codes and report.message, report
        assert report.file == str(path), report
        if report.is_error and report.code not in WHOLE_FILE:
            assert report.line is not None and 1 <= report.line <= nlines + 1, report
        if report.code in KEYED:
            assert report.key and report.section, report


def _assert_changes_nothing(path: Path, host: str, strict: bool = False) -> None:
    """apply of invalid input: exit 1, no step, no command run, nothing written."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "marker").write_text("x")
        runner = ScriptedRunner()
        result = actions.apply(
            path, actions.ApplyOptions(host=host, root=root, strict=strict, runner=runner)
        )
        assert result.exit_code == 1 and result.steps == []
        assert runner.calls == []
        assert sorted(p.name for p in root.rglob("*")) == ["marker"]


# -- properties ---------------------------------------------------------------------------


@SETTINGS
@given(st.text(), st.sampled_from(["Alpha", "alpha", "x.y"]), st.booleans())
def test_any_ini_text_never_crashes_and_errors_are_located(
    text: str, host: str, strict: bool
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "DTSetup.ini"
        path.write_text(text, encoding="utf-8")
        result = model.load(path, host=host, strict=strict)
        _check_located(result, path, len(text.splitlines()))
        if not result.ok:
            _assert_changes_nothing(path, host, strict)


@SETTINGS
@given(
    st.sampled_from([b"", codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE]),
    st.binary(),
    st.sampled_from(["DTSetup.ini", "dtsetup.yaml"]),
)
def test_any_bytes_never_crash(bom: bytes, data: bytes, name: str) -> None:
    """Also behind each BOM the reader honours (a cut-off UTF-16 file once raised)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(bom + data)
        result = model.load(path, host="Alpha")
        for report in result.reports:
            assert report.file == str(path) and report.message


@SETTINGS
@given(st.text(), st.sampled_from(["Alpha", "Config"]))
def test_any_yaml_text_never_crashes_and_errors_are_located(text: str, host: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dtsetup.yaml"
        path.write_text(text, encoding="utf-8")
        result = model.load(path, host=host)
        _check_located(result, path, len(text.splitlines()))
        if not result.ok:
            _assert_changes_nothing(path, host)


@SETTINGS
@given(ini_documents(), st.booleans(), st.booleans(), st.data())
def test_valid_ini_gives_the_written_values(
    doc: Rendered, crlf: bool, bom: bool, data: st.DataObject
) -> None:
    chosen = data.draw(st.sampled_from(doc.sections))
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), doc.lines, name="DTSetup.ini", crlf=crlf, bom=bom)
        result = model.load(path, host=chosen.name, strict=True)
        assert result.ok, [r.render() for r in result.reports if r.is_error]
        assert result.settings is not None and result.settings.section == chosen.name
        assert result.settings.to_keys() == _expected(chosen)
        _check_located(result, path, len(doc.lines))


FAULTS = ("unknown_key", "duplicate_key", "bad_value", "syntax", "duplicate_section", "winpath")


@SETTINGS
@given(ini_documents(), st.sampled_from(FAULTS), st.data())
def test_one_ini_fault_is_reported_exactly_where_it_is(
    doc: Rendered, fault: str, data: st.DataObject
) -> None:
    section = data.draw(st.sampled_from(doc.sections))
    entry = data.draw(st.sampled_from(section.entries))
    lines = list(doc.lines)
    at = entry.line  # 1-based line of the chosen entry
    key: str | None = entry.key
    if fault == "unknown_key":
        lines.insert(at, "COLOUR=blue")  # becomes line at + 1, inside the same section
        line, code, key = at + 1, Code.UNKNOWN_KEY, "COLOUR"
    elif fault == "duplicate_key":
        lines.insert(at, lines[at - 1])
        line, code = at + 1, Code.DUPLICATE_KEY
    elif fault == "bad_value":
        lines[at - 1] = f"{entry.written}={data.draw(INVALID[entry.key])}"
        line, code = at, Code.BAD_VALUE
    elif fault == "syntax":
        lines.insert(at, "this line has no equals sign")
        line, code, key = at + 1, Code.INI_SYNTAX, None
    elif fault == "duplicate_section":
        lines.append(f"[{section.name}]")
        line, code, key = len(lines), Code.DUPLICATE_SECTION, None
    else:  # a Windows path, with --strict
        folders = [e for e in section.entries if e.key in model.PATH_KEYS]
        assume(folders)
        entry = data.draw(st.sampled_from(folders))
        at = entry.line
        lines[at - 1] = f'{entry.written}="C:\\Program Files\\Vision Solutions\\Double-Take"'
        line, code, key = at, Code.WINDOWS_PATH, entry.key
    with tempfile.TemporaryDirectory() as tmp:
        path = _write(Path(tmp), lines, name="DTSetup.ini", crlf=False, bom=False)
        result = model.load(path, host=section.name, strict=True)
        errors = [(r.code, r.line, r.section, r.key) for r in result.reports if r.is_error]
        assert errors == [(code, line, section.name, key)], (lines, errors)
        _assert_changes_nothing(path, section.name, strict=True)


# -- YAML -----------------------------------------------------------------------------------


def _yaml_scalar(key: str, raw: str, typed: Any, as_native: bool) -> Any:
    """The value as a YAML pipeline would write it: natively typed, or the INI text."""
    if not as_native:
        return raw
    if key in ("DTSERVICESTARTUP", "SET_FWPORT"):
        return bool(typed)
    if isinstance(typed, int):
        return typed
    return raw


@SETTINGS
@given(documents(), st.booleans(), st.data())
def test_valid_yaml_gives_the_written_values(
    sections: list[Section], native: bool, data: st.DataObject
) -> None:
    body = {
        s.name: {e.written: _yaml_scalar(e.key, e.raw, e.typed, native) for e in s.entries}
        for s in sections
    }
    chosen = data.draw(st.sampled_from(sections))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dtsetup.yaml"
        text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
        path.write_text(text)
        result = model.load(path, host=chosen.name)
        assert result.ok, [r.render() for r in result.reports if r.is_error]
        assert result.settings is not None
        assert result.settings.to_keys() == _expected(chosen)
        _check_located(result, path, len(text.splitlines()))


@SETTINGS
@given(
    documents(), st.sampled_from(("unknown_key", "duplicate_key", "bad_value", "list")), st.data()
)
def test_one_yaml_fault_is_reported_exactly_where_it_is(
    sections: list[Section], fault: str, data: st.DataObject
) -> None:
    """Rendered by hand, one "KEY: value" per line, so every line number is known."""
    section = data.draw(st.sampled_from(sections))
    entry = data.draw(st.sampled_from(section.entries))
    lines: list[str] = []
    where = 0
    for s in sections:
        lines.append(f"{yaml.safe_dump(s.name).splitlines()[0]}:")
        for e in s.entries:
            lines.append(f"  {e.written}: {yaml.safe_dump(e.raw).splitlines()[0]}")
            if e is entry:
                where = len(lines)
    key: str = entry.key
    if fault == "unknown_key":
        lines.insert(where, "  COLOUR: blue")
        line, code, key = where + 1, Code.UNKNOWN_KEY, "COLOUR"
    elif fault == "duplicate_key":
        lines.insert(where, lines[where - 1])
        line, code = where + 1, Code.DUPLICATE_KEY
    elif fault == "bad_value":
        bad = yaml.safe_dump(data.draw(INVALID[entry.key])).splitlines()[0]
        lines[where - 1] = f"  {entry.written}: {bad}"
        line, code = where, Code.BAD_VALUE
    else:
        lines[where - 1] = f"  {entry.written}: [1, 2]"
        line, code = where, Code.BAD_VALUE
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dtsetup.yml"
        path.write_text("\n".join(lines) + "\n")
        result = model.load(path, host=section.name)
        errors = [(r.code, r.line, r.section, r.key) for r in result.reports if r.is_error]
        assert errors == [(code, line, section.name, key)], (lines, errors)
        _assert_changes_nothing(path, section.name)


@SETTINGS
@given(documents(), st.sampled_from(["ini", "yaml"]), st.data())
def test_export_reads_back_as_the_same_settings(
    sections: list[Section], fmt: str, data: st.DataObject
) -> None:
    """``export --include-secrets`` gives input that ``apply`` reads as the same settings
    (the record holds typed values; export writes them back in input form)."""
    chosen = data.draw(st.sampled_from(sections))
    with tempfile.TemporaryDirectory() as tmp:
        lines = [f"[{chosen.name}]"] + [f"{e.written}={e.raw}" for e in chosen.entries]
        source = _write(Path(tmp), lines, name="DTSetup.ini", crlf=False, bom=False)
        loaded = model.load(source, host=chosen.name)
        assert loaded.settings is not None
        keys = loaded.settings.to_keys()
        renderer = render.export_yaml if fmt == "yaml" else render.export_ini
        text = renderer(chosen.name, keys, include_secrets=True)
        back = Path(tmp) / ("export.yaml" if fmt == "yaml" else "export.ini")
        back.write_text(text)
        again = model.load(back, host=chosen.name)
        assert again.ok, [r.render() for r in again.reports if r.is_error]
        assert again.settings is not None and again.settings.to_keys() == keys
        assert [r for r in again.reports if r.code is Code.MISSING_KEY] == []


# -- what the properties found, kept as plain examples ------------------------------------


def test_cut_off_utf16_file_is_read_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "DTSetup.ini"
    path.write_bytes(codecs.BOM_UTF16_LE + "[Config]\nPORT=7000\n".encode("utf-16-le")[:-1])
    result = model.load(path, host="h")  # used to raise UnicodeDecodeError
    assert not result.ok or result.settings is not None


def test_yaml_control_character_is_located(tmp_path: Path) -> None:
    path = tmp_path / "dtsetup.yaml"
    path.write_text("Config:\n  PORT: 6320\n  SET_FWPORT: \x1f\n")
    errors = [(r.code, r.line) for r in model.load(path, host="h").reports if r.is_error]
    assert errors == [(Code.YAML_SYNTAX, 3)]  # the reader's error had no line


def test_yaml_list_activation_code_is_one_error(tmp_path: Path) -> None:
    path = tmp_path / "dtsetup.yaml"
    path.write_text("Config:\n  DTACTIVATIONCODE: [a, b]\n")
    errors = [(r.code, r.line) for r in model.load(path, host="h").reports if r.is_error]
    assert errors == [(Code.BAD_VALUE, 2)]  # not also MISSING_ACTIVATION_CODE
