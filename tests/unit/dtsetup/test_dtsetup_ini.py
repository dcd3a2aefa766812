"""DTSetup.ini reading: the seed's sample, case rules, quoting, duplicates, blanks."""

from __future__ import annotations

import codecs
from pathlib import Path

from dtsetup import ini
from dtsetup.reports import Code


def codes(reports: list) -> list[str]:  # type: ignore[type-arg]
    return [str(r.code) for r in reports]


def test_seed_sample_reads_unchanged(seed_ini: Path) -> None:
    doc, reports = ini.load(seed_ini)
    assert reports == []
    assert list(doc.sections) == ["Config", "Alpha", "Beta"]
    config = doc.sections["Config"]
    assert config.line == 1
    assert config.entries["PORT"].value == "6320"
    assert config.entries["PORT"].line == 19
    # quotes stripped, backslashes kept
    assert (
        config.entries["DOUBLETAKEFOLDER"].value
        == "C:\\Program Files\\Double-Take Software\\Double-Take"
    )
    assert doc.sections["Alpha"].line == 25  # after the NBSP separator line


def test_keys_case_insensitive_sections_case_sensitive() -> None:
    doc, reports = ini.parse("[Alpha]\nDTSetupType=DTNT\n[alpha]\nport=1\n", "f")
    assert reports == []
    assert set(doc.sections) == {"Alpha", "alpha"}
    assert doc.sections["Alpha"].entries["DTSETUPTYPE"].written_key == "DTSetupType"
    assert "PORT" in doc.sections["alpha"].entries


def test_quoting_one_pair_only() -> None:
    doc, _ = ini.parse('[C]\nA="x y"\nB=""\nC="unbalanced\nD= spaced \nE="a"b"\n', "f")
    e = doc.sections["C"].entries
    assert e["A"].value == "x y"
    assert e["B"].value is None  # "" is blank
    assert e["C"].value == '"unbalanced'
    assert e["D"].value == "spaced"
    assert e["E"].value == 'a"b'


def test_duplicates_are_errors_with_lines() -> None:
    text = "[Config]\nPORT=1\nport=2\n[Config]\nPORT=3\n"
    _, reports = ini.parse(text, "f")
    assert codes(reports) == ["DUPLICATE_KEY", "DUPLICATE_SECTION"]
    assert [r.line for r in reports] == [3, 4]
    assert reports[0].key == "PORT" and reports[0].section == "Config"


def test_every_syntax_problem_reported_in_one_run() -> None:
    text = "PORT=1\n[Config\n[]\ngarbage line\n=value\n[Ok]\nX=1\n"
    _, reports = ini.parse(text, "f.ini")
    assert codes(reports) == [
        "KEY_OUTSIDE_SECTION",
        "INI_SYNTAX",
        "EMPTY_SECTION_NAME",
        "INI_SYNTAX",
        "INI_SYNTAX",
    ]
    assert [r.line for r in reports] == [1, 2, 3, 4, 5]
    assert all(r.file == "f.ini" for r in reports)


def test_blank_value_is_none_and_comments_ignored() -> None:
    doc, reports = ini.parse("; comment\n# other\n[Config]\nPORT=\n  \n\u00a0\n", "f")
    assert reports == []
    assert doc.sections["Config"].entries["PORT"].value is None


def test_empty_file_has_no_sections() -> None:
    _, reports = ini.parse("\n\n", "f")
    assert codes(reports) == ["NO_SECTIONS"]


def test_windows_encodings(tmp_path: Path) -> None:
    text = "[Config]\r\nPORT=6320\r\n"
    for name, data in {
        "bom.ini": codecs.BOM_UTF8 + text.encode(),
        "utf16.ini": text.encode("utf-16"),
        "ansi.ini": "[Config]\r\nDOUBLETAKEFOLDER=C:\\Caf\u00e9\r\n".encode("cp1252"),
    }.items():
        path = tmp_path / name
        path.write_bytes(data)
        doc, reports = ini.load(path)
        assert reports == [], name
        assert "Config" in doc.sections, name
    assert doc.sections["Config"].entries["DOUBLETAKEFOLDER"].value == "C:\\Caf\u00e9"


def test_unreadable_file(tmp_path: Path) -> None:
    _, reports = ini.load(tmp_path / "missing.ini")
    assert codes(reports) == ["FILE_UNREADABLE"]
    assert reports[0].code is Code.FILE_UNREADABLE
