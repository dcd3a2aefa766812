"""The same settings as YAML: shape, lines, duplicates, YAML booleans."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from dtsetup import model

YAML = """\
Config:
  DTSETUPTYPE: DTNT
  DTACTIVATIONCODE: "{code}"
  DOUBLETAKEFOLDER: /opt/dtake
  QMEMORYBUFFERMAX: 256
  DISKQUEUEFOLDER: /var/lib/dtake/queue
  DISKQUEUEMAXSIZE: UNLIMITED
  DISKFREESPACEMIN: 50
  DTServiceStartup: true
  PORT: 6321
  SET_FWPORT: N
Alpha:
  DTACTIVATIONCODE: "{code}"
  PORT: 7000
"""


def test_yaml_equivalent_to_ini(write_file: Callable[..., Path], code: str) -> None:
    path = write_file(YAML.format(code=code), "setup.yaml")
    result = model.load(path, host="gamma")
    assert result.ok, result.reports
    s = result.settings
    assert s is not None
    assert (s.port, s.memory_buffer_max_mb, s.service_startup, s.set_fw_port) == (
        6321,
        256,
        True,
        False,
    )
    alpha = model.load(path, host="Alpha")
    assert alpha.settings is not None and alpha.settings.port == 7000
    assert {r.key for r in alpha.reports if str(r.code) == "MISSING_KEY"} == set(model.KEYS) - {
        "PORT",
        "DTACTIVATIONCODE",
    }


def test_yaml_errors_located(write_file: Callable[..., Path], code: str) -> None:
    text = f"Config:\n  DTACTIVATIONCODE: {code}\n  PORT: 99999\n  port: 1\n  Bogus: 1\n  SET_FWPORT: [1]\n"
    result = model.load(write_file(text, "s.yml"), host="h")
    found = sorted((str(r.code), r.key, r.line) for r in result.reports if r.is_error)
    assert found == [
        ("BAD_VALUE", "PORT", 3),
        ("BAD_VALUE", "SET_FWPORT", 6),
        ("DUPLICATE_KEY", "PORT", 4),
        ("UNKNOWN_KEY", "BOGUS", 5),
    ]


def test_yaml_duplicate_section_and_shape(write_file: Callable[..., Path]) -> None:
    result = model.load(
        write_file("A:\n  PORT: 7000\nA:\n  PORT: 7001\nB: 3\n", "s.yaml"), host="h"
    )
    found = [(str(r.code), r.line) for r in result.reports if r.is_error]
    assert ("DUPLICATE_SECTION", 3) in found
    assert ("YAML_SHAPE", 5) in found


def test_yaml_syntax_and_top_level(write_file: Callable[..., Path]) -> None:
    bad = model.load(write_file("Config:\n  PORT: [1\n", "a.yaml"), host="h")
    assert [str(r.code) for r in bad.reports] == ["YAML_SYNTAX"]
    assert bad.reports[0].line is not None
    listy = model.load(write_file("- 1\n- 2\n", "b.yaml"), host="h")
    assert [str(r.code) for r in listy.reports] == ["YAML_SHAPE"]
    empty = model.load(write_file("", "c.yaml"), host="h")
    assert [str(r.code) for r in empty.reports] == ["NO_SECTIONS"]


def test_yaml_null_is_blank(write_file: Callable[..., Path], code: str) -> None:
    result = model.load(
        write_file(f"Config:\n  DTACTIVATIONCODE: {code}\n  PORT:\n", "n.yaml"), host="h"
    )
    assert result.ok
    assert [(str(r.code), r.line) for r in result.reports if r.key == "PORT"] == [
        ("BLANK_VALUE", 3)
    ]
