"""Property-style fuzzing of INI and YAML input (seeded, so failures reproduce): reading
never crashes, and every error names a line (except whole-file problems)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from dtsetup import model

WHOLE_FILE = {"NO_SECTIONS", "NO_SECTION_FOR_HOST", "FILE_UNREADABLE"}
ALPHABET = "[]=\"';#:-\n \t\\/\u00a0xYZ019"


def _mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 8)):
        op = rng.randrange(4)
        pos = rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op == 1:
            chars.insert(pos, rng.choice(ALPHABET))
        elif op == 2 and chars:  # duplicate a line
            lines = "".join(chars).splitlines(keepends=True)
            line = rng.choice(lines)
            chars = list("".join(lines) + line)
        else:
            chars.insert(pos, rng.choice(["=", "\n[", "]\n", '"', "UNLIMITED", "-1"]))
    return "".join(chars)


def _check(result: model.LoadResult) -> None:
    for report in result.reports:
        if report.is_error and str(report.code) not in WHOLE_FILE:
            assert report.line is not None, report
        assert report.message


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_ini(tmp_path: Path, seed_ini: Path, seed: int) -> None:
    rng = random.Random(seed)
    base = seed_ini.read_text()
    for i in range(40):
        text = _mutate(rng, base)
        path = tmp_path / f"f{i}.ini"
        path.write_text(text)
        _check(
            model.load(path, host=rng.choice(["Alpha", "alpha", "x"]), strict=rng.random() < 0.3)
        )


@pytest.mark.parametrize("seed", range(8))
def test_fuzz_yaml(tmp_path: Path, seed: int) -> None:
    rng = random.Random(1000 + seed)
    base = (
        "Config:\n  DTACTIVATIONCODE: 123456789012345678901234\n  PORT: 6320\n"
        "  DISKQUEUEMAXSIZE: UNLIMITED\n  SET_FWPORT: Y\nAlpha:\n  PORT: 7000\n"
    )
    for i in range(40):
        text = _mutate(rng, base)
        path = tmp_path / f"f{i}.yaml"
        path.write_text(text)
        _check(model.load(path, host="Alpha"))
