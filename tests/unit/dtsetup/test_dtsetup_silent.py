"""The seed's silent command line [L681-687], through a real shell's quoting."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from dtsetup.silent import is_silent, parse_silent

VERBATIM = 'dtsetup /s /v"DTSETUPINI=\\"/tmp/inst/DTSetup.ini\\" /qn"'


def test_verbatim_after_shell_quoting() -> None:
    argv = shlex.split(VERBATIM)[1:]
    assert argv == ["/s", '/vDTSETUPINI="/tmp/inst/DTSetup.ini" /qn']
    assert is_silent(argv)
    assert parse_silent(argv) == (Path("/tmp/inst/DTSetup.ini"), None)


def test_unprocessed_quotes_also_read() -> None:
    argv = ["/s", '/v"DTSETUPINI=\\"/tmp/inst/DTSetup.ini\\" /qn"']
    assert parse_silent(argv)[0] == Path("/tmp/inst/DTSetup.ini")


@pytest.mark.parametrize(
    "line",
    [
        'dtsetup /s /v "DTSETUPINI=\\"/tmp/DTSetup.ini\\" /qn"',  # space after /v
        'dtsetup /s /v"DTSETUPINI=\\"/tmp/DTSetup.ini\\"  /qn"',  # two spaces before /qn
        'dtsetup /s /v"DTSETUPINI=\\"/tmp/DTSetup.ini\\"/qn"',  # no space before /qn
        'dtsetup /S /v"DTSETUPINI=\\"/tmp/DTSetup.ini\\" /qn"',  # case-sensitive
        'dtsetup /s /v"dtsetupini=\\"/tmp/DTSetup.ini\\" /qn"',
        'dtsetup /s /v"DTSETUPINI=\\"/tmp/DT Setup.ini\\" /qn"',  # space in the path
        'dtsetup /s /v"DTSETUPINI=\\"/tmp/DTSetup.ini\\" /QN"',
        "dtsetup /s",
    ],
)
def test_spacing_and_case_rules(line: str) -> None:
    argv = shlex.split(line)[1:]
    assert is_silent(argv)
    path, problem = parse_silent(argv)
    assert path is None
    assert problem is not None and str(problem.code) == "SILENT_SYNTAX"


def test_spaces_between_words_are_the_shells_business() -> None:
    # A shell collapses "/s  /v..." to the same argv as "/s /v...": nothing to detect.
    assert shlex.split('a /s  /v"X=1 /qn"')[1:] == shlex.split('a /s /v"X=1 /qn"')[1:]


def test_subcommands_are_not_silent() -> None:
    assert not is_silent(["apply", "/tmp/x.ini"])
    assert not is_silent([])
