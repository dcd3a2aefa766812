"""dtake/config.py: the one HOST[:PORT] parser (the CLI's targets, restore connect's
source)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import dtake
from dtake.config import DEFAULT_PORT, ServiceConfig, split_hostport


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("10.0.0.1", ("10.0.0.1", DEFAULT_PORT)),
        ("10.0.0.1:6321", ("10.0.0.1", 6321)),
        ("alpha", ("alpha", 6320)),
        ("alpha:7000", ("alpha", 7000)),
        ("[fe80::1]:6322", ("fe80::1", 6322)),
        ("[fe80::1]", ("fe80::1", 6320)),
        ("fe80::1", ("fe80::1", 6320)),  # bare v6: no port
        ("::1", ("::1", 6320)),
        ("alpha:1", ("alpha", 1)),
        ("alpha:65535", ("alpha", 65535)),
    ],
)
def test_split_hostport(text: str, want: tuple[str, int]) -> None:
    assert split_hostport(text) == want


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("alpha:x", "bad port 'x' in 'alpha:x': a number from 1 to 65535"),
        ("alpha:", "bad port ''"),
        ("alpha:0", "bad port '0'"),
        ("alpha:65536", "bad port '65536'"),
        ("alpha:-1", "bad port '-1'"),
        ("alpha: 70", "bad port ' 70'"),
        ("alpha:\u0667", "bad port '\u0667'"),  # a digit, but not an ASCII one
        ("[fe80::1]:x", "bad port 'x'"),
        ("[fe80::1]:", "bad port ''"),
        ("[fe80::1]x", "expected ':PORT' after ']'"),
        ("[fe80::1", "missing ']'"),
        (":6320", "no host"),
        ("[]:6320", "no host"),
        ("", "no host"),
    ],
)
def test_split_hostport_refuses_with_the_reason(text: str, says: str) -> None:
    with pytest.raises(ValueError, match="^" + says.replace("[", r"\[").replace("]", r"\]")):
        split_hostport(text)


def test_the_service_listens_on_the_default_port() -> None:
    assert ServiceConfig().port == DEFAULT_PORT == 6320


def test_event_4045_names_the_default_port_it_falls_back_to() -> None:
    # The number comes from DEFAULT_PORT: another default shows in the text.
    code = (
        "import dtake.config\n"
        "dtake.config.DEFAULT_PORT = 7011\n"
        "from dtake.service.events import EVENTS\n"
        "print(EVENTS[4045][1].format(port=80))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    assert out == "The port 80 is out of range; the default port 7011 is used\n"


def _spelled_out_ports(path: Path) -> list[int]:
    """Lines of a module whose code (docstrings and comments aside) holds 6320."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and id(node) not in docstrings
        and (node.value == 6320 or (isinstance(node.value, str) and "6320" in node.value))
    ]


# The packages that name the port, from the top of the checkout (or site-packages).
TOP = Path(dtake.__file__).resolve().parents[1]
PACKAGES = ("dtake", "dtsetup", "resource_agents", "playbooks")
# The agents cannot import dtake (copied standalone, run with -S): their one copy.
AGENTS_COPY = "resource_agents/ocfbase.py"


def test_the_code_uses_default_port_rather_than_spelling_it_out() -> None:
    found = {
        str(p.relative_to(TOP)): lines
        for package in PACKAGES
        for p in sorted((TOP / package).rglob("*.py"))
        if p.relative_to(TOP).as_posix() not in ("dtake/port.py", AGENTS_COPY)
        and (lines := _spelled_out_ports(p))
    }
    assert found == {}


def test_the_agents_copy_of_the_default_port_is_the_same_number() -> None:
    path = TOP / AGENTS_COPY
    tree = ast.parse(path.read_text(), str(path))
    copies = [
        node
        for node in tree.body
        if isinstance(node, ast.Assign)
        and [getattr(t, "id", None) for t in node.targets] == ["DEFAULT_PORT"]
    ]
    assert len(copies) == 1
    value = copies[0].value
    assert isinstance(value, ast.Constant) and value.value == DEFAULT_PORT
    assert _spelled_out_ports(path) == [copies[0].lineno]  # and nowhere else
