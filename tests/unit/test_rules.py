"""Replication-set rules: parsing, precedence, wildcards, layout (dtake/rules.py).

The precedence is seed-engine.md §3.1 (DESIGN); the tables below are the examples of
docs/rules.md. A slow, obvious reference implementation cross-checks the cached fast path.
"""

from __future__ import annotations

import itertools
import random
import re

import pytest

from dtake.rules import Rule, RuleError, RuleSet, parse_rule

# --- parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "path", "include", "recursive", "canonical"),
    [
        ("/data inc, rec", "/data", True, True, "/data inc, rec"),
        ("/data exc", "/data", False, False, "/data exc"),
        ("  /data   INC ,REC  ", "/data", True, True, "/data inc, rec"),
        ("/data rec, inc", "/data", True, True, "/data inc, rec"),
        ("/data inc,rec", "/data", True, True, "/data inc, rec"),
        ("/data include, recursive", "/data", True, True, "/data inc, rec"),
        ("/data Exclude", "/data", False, False, "/data exc"),
        ("/my data/x y inc", "/my data/x y", True, False, "/my data/x y inc"),
        ("/data/a, b exc, rec", "/data/a, b", False, True, "/data/a, b exc, rec"),
        ("/data/inc inc", "/data/inc", True, False, "/data/inc inc"),
        ("/data/ inc", "/data", True, False, "/data inc"),
        ("//data//x/// exc, rec", "/data/x", False, True, "/data/x exc, rec"),
        ("/data/./x inc", "/data/x", True, False, "/data/x inc"),
        ("/data/*.db inc", "/data/*.db", True, False, "/data/*.db inc"),
        ("/ inc, rec", "/", True, True, "/ inc, rec"),
        ("/data/[ab] inc", "/data/[ab]", True, False, "/data/[ab] inc"),
    ],
)
def test_parse_valid(text: str, path: str, include: bool, recursive: bool, canonical: str) -> None:
    rule = parse_rule(text)
    assert rule == Rule(path=path, include=include, recursive=recursive)
    assert str(rule) == canonical
    assert parse_rule(str(rule)) == rule


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", "RULE_EMPTY"),
        ("   ", "RULE_EMPTY"),
        ("data inc", "RULE_NOT_ABSOLUTE"),
        ("./data inc, rec", "RULE_NOT_ABSOLUTE"),
        ("/data/../etc inc", "RULE_DOTDOT"),
        ("/.. exc", "RULE_DOTDOT"),
        ("/da\x00ta inc", "RULE_NUL"),
        ("/data", "RULE_SYNTAX"),
        ("/data foo", "RULE_SYNTAX"),
        ("inc", "RULE_SYNTAX"),
        ("/data inc rec", "RULE_FLAGS"),  # path "/data inc", flags "rec"
        ("/data rec", "RULE_FLAGS"),
        ("/data inc, exc", "RULE_FLAGS"),
        ("/data inc, inc", "RULE_FLAGS"),
    ],
)
def test_parse_errors(text: str, code: str) -> None:
    with pytest.raises(RuleError) as info:
        parse_rule(text)
    assert info.value.code == code
    assert info.value.rule_text == text
    assert repr(text) in str(info.value)


@pytest.mark.parametrize("path", ["/data/", "//data", "data", "/a/../b", "", "/a/./b"])
def test_rule_constructor_requires_canonical_path(path: str) -> None:
    with pytest.raises(RuleError):
        Rule(path=path, include=True, recursive=True)


def test_from_list_to_list_round_trip_and_error_index() -> None:
    items = ["/data  INC, REC", "/data/tmp exc,rec", "/data/*.db inc"]
    rs = RuleSet.from_list(items)
    assert rs.to_list() == ["/data inc, rec", "/data/tmp exc, rec", "/data/*.db inc"]
    assert RuleSet.from_list(rs.to_list()) == rs
    with pytest.raises(RuleError) as info:
        RuleSet.from_list(["/data inc, rec", "relative inc"])
    assert info.value.code == "RULE_NOT_ABSOLUTE"
    assert info.value.index == 1
    assert info.value.rule_text == "relative inc"
    assert str(info.value) == "rule path must be absolute (start with /) (rule 2): 'relative inc'"


# --- precedence ------------------------------------------------------------------------

# (rules, [(path, is_dir, expected)]) -- the examples of docs/rules.md.
PRECEDENCE: list[tuple[list[str], list[tuple[str, bool, bool]]]] = [
    (  # rec covers the whole subtree; nothing outside; ancestors above the base are not
        ["/data inc, rec"],
        [
            ("/data", True, True),
            ("/data/a", False, True),
            ("/data/a/b/c", False, True),
            ("/datax", False, False),
            ("/other/f", False, False),
            ("/", True, False),
        ],
    ),
    (  # a deeper exclude wins over its include ancestor, for the whole subtree
        ["/data inc, rec", "/data/tmp exc, rec"],
        [
            ("/data/tmp", True, False),
            ("/data/tmp/x", False, False),
            ("/data/tmp/a/b", True, False),
            ("/data/tmpx", False, True),
            ("/data/f", False, True),
        ],
    ),
    (  # an include below an exclude wins again; the excluded dir is kept as the path to it
        ["/data inc, rec", "/data/tmp exc, rec", "/data/tmp/keep inc, rec"],
        [
            ("/data/tmp/keep/f", False, True),
            ("/data/tmp/keep", True, True),
            ("/data/tmp", True, True),
            ("/data/tmp/other", False, False),
            ("/data/tmp/other", True, False),
            ("/data/tmp/f", False, False),
        ],
    ),
    (  # equal specificity: exclude beats include, whatever the order
        ["/data inc, rec", "/data exc, rec"],
        [("/data/x", False, False), ("/data", True, False)],
    ),
    (
        ["/data exc, rec", "/data inc, rec"],
        [("/data/x", False, False)],
    ),
    (  # non-recursive dir rule: the dir and the files directly in it, not subdirectories
        ["/data inc"],
        [
            ("/data", True, True),
            ("/data/f", False, True),
            ("/data/sub", True, False),
            ("/data/sub/f", False, False),
        ],
    ),
    (  # non-recursive exclude: only the dir and its files; a subdir stays included
        ["/data inc, rec", "/data/a exc"],
        [
            ("/data/a/f", False, False),
            ("/data/a/sub", True, True),
            ("/data/a/sub/f", False, True),
            ("/data/a", True, True),  # ancestor of included paths
        ],
    ),
    (  # wildcard last component, non-recursive: matching entries of that dir only
        ["/data/*.db inc"],
        [
            ("/data/a.db", False, True),
            ("/data/a.txt", False, False),
            ("/data/x/a.db", False, False),
            ("/data", True, True),
            ("/data/x", True, False),
        ],
    ),
    (  # wildcard last component, recursive: matching entries at any depth
        ["/data/*.db inc, rec"],
        [
            ("/data/a.db", False, True),
            ("/data/x/y/a.db", False, True),
            ("/data/x/a.txt", False, False),
            ("/data/x", True, True),
            ("/data/x/y", True, True),
        ],
    ),
    (  # literal beats wildcard at equal depth
        ["/data inc, rec", "/data/*.log exc, rec", "/data/app.log inc"],
        [
            ("/data/app.log", False, True),
            ("/data/x.log", False, False),
            ("/data/sub/x.log", False, False),
            ("/data/sub/app.log", False, False),
            ("/data/sub/x.txt", False, True),
        ],
    ),
    (  # a deeper rule wins even when it has a wildcard
        ["/data/x inc, rec", "/data/x/*.log exc"],
        [("/data/x/a.log", False, False), ("/data/x/a.txt", False, True)],
    ),
    (  # specificity is the rule's own path: a deeper include beats a shallower wildcard
        ["/data inc, rec", "/data/*.tmp exc, rec", "/data/x inc, rec"],
        [
            ("/data/a.tmp", False, False),
            ("/data/y/a.tmp", False, False),
            ("/data/x/a.tmp", False, True),
        ],
    ),
    (  # exclude only: nothing is considered
        ["/data exc, rec"],
        [("/data/x", False, False), ("/data", True, False)],
    ),
    (  # ? is one character; case-sensitive; * matches dot-files; [ ] are literal
        ["/data/file?.txt inc", "/data/*.DB inc", "/data/.cfg/* inc", "/data/[ab] inc"],
        [
            ("/data/file1.txt", False, True),
            ("/data/file12.txt", False, False),
            ("/data/file.txt", False, False),
            ("/data/a.DB", False, True),
            ("/data/a.db", False, False),
            ("/data/.cfg/.hidden", False, True),
            ("/data/[ab]", False, True),
            ("/data/a", False, False),
        ],
    ),
    (  # wildcard inside the path
        ["/home/*/mail inc, rec"],
        [
            ("/home/alice/mail/inbox", False, True),
            ("/home/alice/mail", True, True),
            ("/home/alice/docs/x", False, False),
            ("/home/alice/docs", True, False),
            ("/home/alice", True, True),
            ("/home", True, True),
        ],
    ),
    (  # auto-excludes, whatever the rules say
        ["/ inc, rec", "/proc inc, rec", "/dev/sda inc"],
        [
            ("/proc", True, False),
            ("/proc/1/status", False, False),
            ("/sys/kernel", True, False),
            ("/dev/sda", False, False),
            ("/devices", False, True),
            ("/etc/hosts", False, True),
            ("/", True, True),
        ],
    ),
]


@pytest.mark.parametrize(
    ("rules", "path", "is_dir", "expected"),
    [(rules, p, d, e) for rules, cases in PRECEDENCE for p, d, e in cases],
)
def test_matches(rules: list[str], path: str, is_dir: bool, expected: bool) -> None:
    rs = RuleSet.from_list(rules)
    assert rs.matches(path, is_dir=is_dir) is expected
    # Asking twice exercises the per-directory cache.
    assert rs.matches(path, is_dir=is_dir) is expected


def test_extra_excludes() -> None:
    rs = RuleSet.from_list(["/var inc, rec"], extra_excludes=["/var/lib/dtake/"])
    assert rs.matches("/var/lib/x")
    assert not rs.matches("/var/lib/dtake", is_dir=True)
    assert not rs.matches("/var/lib/dtake/queue/0001.log")
    assert not rs.dir_may_contain("/var/lib/dtake/queue")
    assert rs.matches("/var/lib/dtakex")


def test_decide_names_the_winning_rule() -> None:
    rs = RuleSet.from_list(["/data inc, rec", "/data/tmp exc, rec"])
    assert rs.decide("/data/tmp/x") == Rule("/data/tmp", include=False, recursive=True)
    assert rs.decide("/data/x") == Rule("/data", include=True, recursive=True)
    assert rs.decide("/elsewhere") is None


@pytest.mark.parametrize(
    ("rules", "path", "expected"),
    [
        (["/data inc, rec", "/data/tmp exc, rec"], "/data/tmp", False),
        (["/data inc, rec", "/data/tmp exc, rec"], "/data/tmp/a", False),
        (["/data inc, rec", "/data/tmp exc, rec"], "/data", True),
        (["/data inc, rec", "/data/tmp exc, rec"], "/data/a", True),
        (["/data inc, rec", "/data/tmp exc, rec"], "/", True),
        (["/data inc, rec", "/data/tmp exc, rec"], "/other", False),
        (["/data inc, rec", "/data/tmp exc, rec", "/data/tmp/k inc"], "/data/tmp", True),
        (["/data inc, rec", "/data/tmp exc, rec", "/data/tmp/k inc"], "/data/tmp/x", False),
        (["/data inc"], "/data", True),
        (["/data inc"], "/data/sub", False),
        (["/data/*.db inc, rec"], "/data/a/b", True),
        (["/data/*.db inc"], "/data/a", False),
        (["/home/*/mail inc, rec"], "/home/bob", True),
        (["/home/*/mail inc, rec"], "/home/bob/docs", False),
        (["/ inc, rec"], "/proc", False),
        (["/ inc, rec"], "/dev/shm", False),
        (["/data exc, rec"], "/data", False),
        (["/data inc, rec", "/data exc, rec"], "/data", False),
    ],
)
def test_dir_may_contain(rules: list[str], path: str, expected: bool) -> None:
    assert RuleSet.from_list(rules).dir_may_contain(path) is expected


# --- base and watch roots --------------------------------------------------------------


@pytest.mark.parametrize(
    ("rules", "base"),
    [
        (["/data inc, rec"], "/data"),
        (["/data/a inc, rec", "/data/b inc"], "/data"),
        (["/data/a/x inc, rec", "/data/ab inc"], "/data"),
        (["/data/*.db inc"], "/data"),
        (["/home/*/mail inc, rec"], "/home"),
        (["/data inc, rec", "/data/tmp exc, rec", "/elsewhere exc"], "/data"),
        (["/a inc", "/b inc"], "/"),
    ],
)
def test_base(rules: list[str], base: str) -> None:
    assert RuleSet.from_list(rules).base() == base


def test_base_without_include() -> None:
    with pytest.raises(RuleError) as info:
        RuleSet.from_list(["/data exc, rec"]).base()
    assert info.value.code == "RULE_NO_INCLUDE"


@pytest.mark.parametrize(
    ("rules", "roots"),
    [
        (["/data inc, rec", "/data/tmp exc, rec"], ["/data"]),
        (["/data/a inc, rec", "/data/a/b inc", "/data/c/*.db inc"], ["/data/a", "/data/c"]),
        (["/srv/b inc", "/srv/a inc, rec", "/srv/ab inc"], ["/srv/a", "/srv/ab", "/srv/b"]),
        (["/ inc, rec", "/proc inc"], ["/"]),
        (["/proc inc, rec"], []),
        (["/home/*/mail inc, rec"], ["/home"]),
    ],
)
def test_watch_roots(rules: list[str], roots: list[str]) -> None:
    assert RuleSet.from_list(rules).watch_roots() == roots


# --- reference cross-check -------------------------------------------------------------


def _ref_match(pattern: str, name: str) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, name, re.DOTALL) is not None


def _ref_covers(rule: Rule, comps: list[str], is_dir: bool) -> bool:
    """docs/rules.md, written as plainly as possible."""
    r = [c for c in rule.path.split("/") if c]
    m, n = len(r), len(comps)
    if m == 0:
        return rule.recursive or n == 0 or (n == 1 and not is_dir)
    if n < m or not all(_ref_match(a, b) for a, b in zip(r[:-1], comps)):
        return False
    if any(c in r[-1] for c in "*?") and rule.recursive:
        return any(_ref_match(r[-1], comps[k]) for k in range(m - 1, n))
    if not _ref_match(r[-1], comps[m - 1]):
        return False
    return rule.recursive or n == m or (n == m + 1 and not is_dir)


def _ref_priority(rule: Rule) -> tuple[int, int, int, int]:
    r = [c for c in rule.path.split("/") if c]
    lit = [c for c in r if not any(w in c for w in "*?")]
    return (len(r), len(lit), sum(map(len, lit)), 0 if rule.include else 1)


def _random_rules(
    rng: random.Random, comps: list[str], *, most: int, min_depth: int, rec: float
) -> list[Rule]:
    """1 to ``most`` rules of ``min_depth`` to 3 components from ``comps``, 60 %
    includes, ``rec`` of them recursive."""
    rules = []
    for _ in range(rng.randint(1, most)):
        depth = rng.randint(min_depth, 3)
        path = "/" + "/".join(rng.choice(comps) for _ in range(depth))
        rules.append(Rule(path, include=rng.random() < 0.6, recursive=rng.random() < rec))
    return rules


def test_fast_path_agrees_with_reference() -> None:
    """Random rule sets over a tiny alphabet; decide() must equal the plain definition."""
    rng = random.Random(20261125)
    comps = ["a", "b", "ab", "*", "a*", "?"]
    paths = [
        "/" + "/".join(p)
        for k in range(1, 5)
        for p in itertools.product(["a", "b", "ab"], repeat=k)
    ]
    for _ in range(300):
        rules = _random_rules(rng, comps, most=5, min_depth=0, rec=0.5)
        rs = RuleSet(rules)
        for path in paths:
            for is_dir in (False, True):
                split = [c for c in path.split("/") if c]
                covering = [r for r in rules if _ref_covers(r, split, is_dir)]
                want = max(covering, key=_ref_priority) if covering else None
                got = rs.decide(path, is_dir=is_dir)
                assert (got is None) == (want is None), (rules, path, is_dir)
                if got is not None and want is not None:
                    assert _ref_priority(got) == _ref_priority(want), (rules, path, is_dir)
                # dir_may_contain is conservative: if some deeper path is included, True.
                if is_dir and not rs.dir_may_contain(path):
                    below = [p for p in paths if p.startswith(path + "/")]
                    assert not any(rs.decide(p) and rs.decide(p).include for p in below)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("rules", "extra", "path", "expected"),
    [
        (["/data inc, rec"], [], "/data", True),
        (["/data inc, rec"], [], "/data/a/b", True),
        (["/data inc, rec"], [], "/other", False),  # nothing covers it
        (["/data inc"], [], "/data", False),  # files only, not subdirectories
        (["/data inc, rec", "/data/*.tmp exc"], [], "/data", False),  # a child rule
        (["/data inc, rec", "/data/*.tmp exc"], [], "/data/sub", True),  # not below
        (["/data inc, rec", "/data/*.tmp exc, rec"], [], "/data/sub", False),  # any depth
        (["/data inc, rec", "/data/tmp exc, rec"], [], "/data", False),
        (["/data inc, rec", "/data/tmp exc, rec"], [], "/data/tmp", False),
        (["/data inc, rec", "/data/tmp exc, rec"], [], "/data/x", True),
        (["/data inc, rec"], ["/data/q"], "/data", False),  # an automatic exclusion
        (["/data inc, rec"], ["/data/q"], "/data/q", False),
        (["/data inc, rec"], ["/data/q"], "/data/qq", True),
        (["/ inc, rec"], [], "/", False),  # /proc and the like lie below
    ],
)
def test_all_included(rules: list[str], extra: list[str], path: str, expected: bool) -> None:
    assert RuleSet.from_list(rules, extra_excludes=extra).all_included(path) is expected


def test_all_included_agrees_with_matches() -> None:
    """Random rule sets: where all_included says every entry is in, matches agrees
    for every name tried, file or directory."""
    rng = random.Random(20261204)
    comps = ["a", "b", "ab", "*", "a*", "?"]
    dirs = ["/"] + [
        "/" + "/".join(p) for k in range(1, 4) for p in itertools.product(["a", "b"], repeat=k)
    ]
    names = ["a", "b", "ab", "abc", "x"]
    seen_true = 0
    for _ in range(300):
        rules = _random_rules(rng, comps, most=4, min_depth=1, rec=0.6)
        rs = RuleSet(rules, extra_excludes=["/a/b/ab"] if rng.random() < 0.3 else [])
        for d in dirs:
            if not rs.all_included(d):
                continue
            seen_true += 1
            for name in names:
                p = d.rstrip("/") + "/" + name
                assert rs.matches(p) and rs.matches(p, is_dir=True), (rules, p)
    assert seen_true > 50  # the property was exercised
