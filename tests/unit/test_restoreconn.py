"""Restoration connections: the set's rules moved onto the target's copy [L4709]."""

from __future__ import annotations

import pytest

from dtake.rules import RuleSet
from dtake.service.restoreconn import _split_host, map_rules


def test_rules_move_from_the_base_onto_the_copy() -> None:
    rules = ["/srv/www inc, rec", "/srv/www/cache exc, rec", "/srv/www/*.tmp exc", "/var/x exc"]
    out = map_rules(rules, "/srv/www", "/copy/www/")
    assert out == ["/copy/www inc, rec", "/copy/www/cache exc, rec", "/copy/www/*.tmp exc"]
    rs = RuleSet.from_list(out)
    assert rs.base() == "/copy/www"
    assert rs.matches("/copy/www/a/b.txt") and not rs.matches("/copy/www/cache/x")
    assert not rs.matches("/copy/www/f.tmp")


def test_rules_from_the_root_and_several_includes() -> None:
    assert map_rules(["/ inc, rec", "/proc exc, rec"], "/", "/copy") == [
        "/copy inc, rec",
        "/copy/proc exc, rec",
    ]
    out = map_rules(["/data/a inc, rec", "/data/b inc"], "/data", "/c")
    assert out == ["/c/a inc, rec", "/c/b inc"] and RuleSet.from_list(out).base() == "/c"
    # a sibling whose name starts like the base is outside it
    assert map_rules(["/data inc, rec", "/database exc"], "/data", "/c") == ["/c inc, rec"]


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("alpha", ("alpha", 6320)),
        ("alpha:7000", ("alpha", 7000)),
        ("10.0.0.1:6321", ("10.0.0.1", 6321)),
        ("[fe80::1]:6322", ("fe80::1", 6322)),
        ("[fe80::1]", ("fe80::1", 6320)),
    ],
)
def test_source_address(text: str, want: tuple[str, int]) -> None:
    assert _split_host(text) == want
