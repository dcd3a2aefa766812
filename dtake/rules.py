"""Replication-set rules: which paths a replication set replicates.

A replication set is a list of rules, each a path spec plus *inc*/*exc* plus an optional
*rec* (recurse sub-directories) flag [L5154-5156, L5191]; the seed's textual form is
``volume\\directory\\* inc, rec`` and on Linux ``/data inc, rec``. Rules may name paths that
do not exist yet, and may use wildcards ("all .db files") [L5184].

The seed does not state the precedence; seed-engine.md §3.1 (DESIGN) fixes it and
``docs/rules.md`` explains it with examples:

1. a path is considered only when at least one include rule covers it;
2. among the rules that cover it, the most specific wins: more path components first,
   then more literal (wildcard-free) components, then a longer literal text;
3. on a tie, exclude beats include;
4. ``rec`` covers the whole subtree.

The order of rules in the list does not matter. ``/proc``, ``/sys`` and ``/dev`` are never
replicated (DESIGN §3.4), whatever the rules say; the service adds its own queue and state
directories with ``extra_excludes``.

``RuleSet.matches`` runs once per inotify event and once per file of a mirror walk, so the
rules are compiled once and the decision inputs of each parent directory are cached.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

__all__ = [
    "AUTO_EXCLUDES",
    "Rule",
    "RuleError",
    "RuleSet",
    "parse_rule",
]

#: Never replicated, whatever the rules say (seed-engine.md §3.4 DESIGN (Linux)).
AUTO_EXCLUDES: tuple[str, ...] = ("/proc", "/sys", "/dev")

_WILDCARD_CHARS = frozenset("*?")
_CACHE_MAX = 16384


class RuleError(ValueError):
    """A rule (or a list of rules) that cannot be used.

    ``code`` is stable and meant for tests and ``--json`` output; the text is for humans.
    Codes: RULE_EMPTY, RULE_SYNTAX, RULE_FLAGS, RULE_NOT_ABSOLUTE, RULE_DOTDOT, RULE_NUL,
    RULE_NO_INCLUDE.
    """

    def __init__(
        self, code: str, message: str, *, rule_text: str | None = None, index: int | None = None
    ) -> None:
        self.code = code
        self.message = message
        self.rule_text = rule_text if rule_text is not None else ""
        self.index = index
        where = f" (rule {index + 1})" if index is not None else ""
        text = f": {rule_text!r}" if rule_text is not None else ""
        super().__init__(f"{message}{where}{text}")


def _has_wildcard(component: str) -> bool:
    return not _WILDCARD_CHARS.isdisjoint(component)


def _normalise_path(path: str, *, rule_text: str) -> str:
    """Return ``path`` as a canonical absolute path or raise RuleError.

    Duplicate and trailing slashes and ``.`` components are harmless spelling and are
    folded; ``..`` is refused rather than resolved, because a rule must say plainly which
    tree it covers (and a target path must never climb).
    """
    if "\x00" in path:
        raise RuleError("RULE_NUL", "rule path contains a NUL byte", rule_text=rule_text)
    if not path:
        raise RuleError("RULE_EMPTY", "rule has no path", rule_text=rule_text)
    if not path.startswith("/"):
        raise RuleError(
            "RULE_NOT_ABSOLUTE", "rule path must be absolute (start with /)", rule_text=rule_text
        )
    parts = [p for p in path.split("/") if p and p != "."]
    if ".." in parts:
        raise RuleError("RULE_DOTDOT", "rule path must not contain '..'", rule_text=rule_text)
    return "/" + "/".join(parts)


@dataclass(frozen=True, slots=True)
class Rule:
    """One replication-set rule: ``path`` (may hold ``*``/``?`` within components),
    include or exclude, recursive or not. ``str()`` gives the seed's form."""

    path: str
    include: bool
    recursive: bool

    def __post_init__(self) -> None:
        # Direct construction (by the daemon, from JSON) gets the same checks as parsing.
        canonical = _normalise_path(self.path, rule_text=self.path)
        if canonical != self.path:
            raise RuleError(
                "RULE_SYNTAX",
                f"rule path is not canonical (use {canonical!r})",
                rule_text=self.path,
            )

    def __str__(self) -> str:
        flags = "inc" if self.include else "exc"
        return f"{self.path} {flags}, rec" if self.recursive else f"{self.path} {flags}"

    @property
    def components(self) -> tuple[str, ...]:
        """Path components (``()`` for ``/``)."""
        return tuple(p for p in self.path.split("/") if p)

    @property
    def literal_prefix(self) -> str:
        """The path up to (not including) the first component with a wildcard."""
        out: list[str] = []
        for comp in self.components:
            if _has_wildcard(comp):
                break
            out.append(comp)
        return "/" + "/".join(out)


_FLAG_WORDS = {
    "inc": "inc",
    "include": "inc",
    "exc": "exc",
    "exclude": "exc",
    "rec": "rec",
    "recurse": "rec",
    "recursive": "rec",
}
_FLAG_RE = "(?:" + "|".join(sorted(_FLAG_WORDS, key=len, reverse=True)) + ")"
# The flags are the trailing comma-separated list, so a path may contain spaces (and even
# a word like "inc" as long as the real flags follow it).
_RULE_RE = re.compile(
    rf"^(?P<path>.*?)\s+(?P<flags>{_FLAG_RE}(?:\s*,\s*{_FLAG_RE})*)\s*$", re.IGNORECASE
)


def parse_rule(text: str) -> Rule:
    """Parse the seed's form ``PATH inc|exc[, rec]`` (any case, flexible spacing).

    Flags may come in any order (``rec, inc``) and accept the long words ``include``,
    ``exclude``, ``recursive``. Exactly one of inc/exc is required.
    """
    if "\x00" in text:
        raise RuleError("RULE_NUL", "rule contains a NUL byte", rule_text=text)
    stripped = text.strip()
    if not stripped:
        raise RuleError("RULE_EMPTY", "rule is empty", rule_text=text)
    m = _RULE_RE.match(stripped)
    if m is None:
        raise RuleError(
            "RULE_SYNTAX",
            "rule must be 'PATH inc|exc[, rec]' (e.g. '/data inc, rec')",
            rule_text=text,
        )
    words = [_FLAG_WORDS[w.strip().lower()] for w in m.group("flags").split(",")]
    if len(set(words)) != len(words):
        raise RuleError("RULE_FLAGS", "rule repeats a flag", rule_text=text)
    if ("inc" in words) == ("exc" in words):
        raise RuleError("RULE_FLAGS", "rule needs exactly one of 'inc' or 'exc'", rule_text=text)
    path = _normalise_path(m.group("path").strip(), rule_text=text)
    return Rule(path=path, include="inc" in words, recursive="rec" in words)


# --- compiled form ------------------------------------------------------------------

_Matcher = Callable[[str], object]


def _compile_component(comp: str) -> _Matcher:
    """``*`` = any run of characters, ``?`` = one character, all else literal (so ``[`` in
    a file name is just a character). ``*`` matches dot-files too: skipping hidden files
    silently would be data loss."""
    if not _has_wildcard(comp):
        return comp.__eq__
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in comp)
    return re.compile(rx, re.DOTALL).fullmatch


@dataclass(frozen=True, slots=True)
class _Compiled:
    rule: Rule
    matchers: tuple[_Matcher, ...]  # one per component
    prefix: tuple[_Matcher, ...]  # matchers for components [0, m-1)
    last: _Matcher | None  # matcher of component m-1 (None for the rule "/")
    m: int
    wild_last: bool
    include: bool
    recursive: bool
    # Higher wins: specificity, then exclude on a tie.
    priority: tuple[int, int, int, int]

    def prefix_matches(self, comps: Sequence[str]) -> bool:
        return all(match(c) for match, c in zip(self.prefix, comps))


def _compile(rule: Rule) -> _Compiled:
    comps = rule.components
    matchers = tuple(_compile_component(c) for c in comps)
    literal = [c for c in comps if not _has_wildcard(c)]
    spec = (len(comps), len(literal), sum(len(c) for c in literal))
    return _Compiled(
        rule=rule,
        matchers=matchers,
        prefix=matchers[:-1],
        last=matchers[-1] if matchers else None,
        m=len(comps),
        wild_last=bool(comps) and _has_wildcard(comps[-1]),
        include=rule.include,
        recursive=rule.recursive,
        priority=(*spec, 0 if rule.include else 1),
    )


@dataclass(slots=True)
class _DirContext:
    """What decides the fate of the entries directly in one directory.

    ``subtree``: best rule covering the directory with ``rec`` (it covers every child);
    ``files``: best non-recursive rule anchored at the directory (covers its files only);
    ``by_name``: rules whose anchor is the child itself, best first.
    """

    subtree: _Compiled | None
    files: _Compiled | None
    by_name: tuple[_Compiled, ...]
    all_in: bool | None = None  # RuleSet.all_included, once asked

    def decide(self, name: str, is_dir: bool) -> _Compiled | None:
        best = self.subtree
        files = self.files
        if not is_dir and files is not None and (best is None or files.priority > best.priority):
            best = files
        for cand in self.by_name:
            if best is not None and cand.priority <= best.priority:
                break  # sorted best first: nothing later can win
            assert cand.last is not None
            if cand.last(name):
                return cand
        return best


def _best(rules: Iterable[_Compiled]) -> _Compiled | None:
    return max(rules, key=lambda r: r.priority, default=None)


def _split(path: str) -> tuple[str, ...]:
    return tuple(p for p in path.split("/") if p)


class RuleSet:
    """An ordered list of rules with the seed's precedence (see module docstring).

    ``extra_excludes`` are absolute directories treated like /proc: never replicated,
    never walked (the service passes its DiskQueueFolder and state directory, DESIGN
    §3.4).
    """

    __slots__ = (
        "_base",
        "_compiled",
        "_ctx_cache",
        "_excl_exact",
        "_excl_prefix",
        "_may_cache",
        "extra_excludes",
        "rules",
    )

    def __init__(self, rules: Sequence[Rule], *, extra_excludes: Sequence[str] = ()) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        for i, r in enumerate(self.rules):
            if not isinstance(r, Rule):
                raise RuleError("RULE_SYNTAX", f"not a Rule: {r!r}", index=i)
        self.extra_excludes: tuple[str, ...] = tuple(
            _normalise_path(p, rule_text=p) for p in extra_excludes if p
        )
        excl = (*AUTO_EXCLUDES, *self.extra_excludes)
        self._excl_exact: frozenset[str] = frozenset(excl)
        self._excl_prefix: tuple[str, ...] = tuple(p.rstrip("/") + "/" for p in excl)
        self._compiled: tuple[_Compiled, ...] = tuple(_compile(r) for r in self.rules)
        self._ctx_cache: dict[str, _DirContext] = {}
        self._may_cache: dict[str, bool] = {}
        includes = [r.literal_prefix for r in self.rules if r.include]
        self._base: str | None = _common_dir(includes) if includes else None

    # -- construction / serialisation ---------------------------------------------------

    @classmethod
    def from_list(cls, items: Sequence[str], *, extra_excludes: Sequence[str] = ()) -> RuleSet:
        """Parse the seed forms; a RuleError carries ``index`` of the bad item."""
        rules: list[Rule] = []
        for i, text in enumerate(items):
            try:
                rules.append(parse_rule(text))
            except RuleError as exc:
                raise RuleError(exc.code, exc.message, rule_text=text, index=i) from exc
        return cls(rules, extra_excludes=extra_excludes)

    def to_list(self) -> list[str]:
        return [str(r) for r in self.rules]

    # -- decisions ----------------------------------------------------------------------

    def is_auto_excluded(self, path: str) -> bool:
        """True for /proc, /sys, /dev, the extra excludes and anything below them."""
        return path in self._excl_exact or path.startswith(self._excl_prefix)

    def decide(self, path: str, *, is_dir: bool = False) -> Rule | None:
        """The rule that decides ``path`` (None: no rule covers it, or auto-excluded).

        This does not apply the "ancestor directory" rule of ``matches``; it answers
        "which rule won" for explanations and logs.
        """
        if self.is_auto_excluded(path):
            return None
        if path == "/" or not path:
            best = _best(c for c in self._compiled if c.m == 0)
            return best.rule if best is not None else None
        parent, _, name = path.rpartition("/")
        ctx = self._ctx_cache.get(parent)
        if ctx is None:
            ctx = self._context(parent)
        won = ctx.decide(name, is_dir)
        return won.rule if won is not None else None

    def matches(self, path: str, *, is_dir: bool = False) -> bool:
        """Is the absolute, normalised ``path`` replicated?

        A directory that no include covers is still replicated when it lies at or below
        the base and an include may apply beneath it, so the target can create the tree.
        """
        if path in self._excl_exact or path.startswith(self._excl_prefix):
            return False
        parent, _, name = path.rpartition("/")
        if name:
            ctx = self._ctx_cache.get(parent)
            if ctx is None:
                ctx = self._context(parent)
            won = ctx.decide(name, is_dir)
        else:  # "/"
            won = _best(c for c in self._compiled if c.m == 0)
        if won is not None and won.include:
            return True
        if not is_dir or self._base is None:
            return False
        base = self._base
        if not (path == base or path.startswith(base if base == "/" else base + "/")):
            return False
        return self.dir_may_contain(path)

    def all_included(self, path: str) -> bool:
        """Is every entry directly in directory ``path`` included, file or directory,
        whatever its name? (A walk then skips ``matches`` for them.) True only when a
        recursive include covers ``path``, no rule is anchored at a child or at
        ``path``'s files alone unless it includes, and no automatic exclusion lies at or
        below ``path`` or covers it. Cached with the directory's context."""
        ctx = self._ctx_cache.get(path)
        if ctx is None:
            ctx = self._context(path)
        if ctx.all_in is None:
            sub, files = ctx.subtree, ctx.files
            top = path.rstrip("/") + "/"
            ctx.all_in = (
                sub is not None
                and sub.include
                and not ctx.by_name
                and (files is None or files.include)
                and not top.startswith(self._excl_prefix)
                and not any(x.startswith(top) for x in self._excl_prefix)
            )
        return ctx.all_in

    def dir_may_contain(self, path: str) -> bool:
        """May a walk or watch below directory ``path`` find included entries?

        Conservative: False only when nothing below can be included, so a walk or a
        watch may be pruned there. True for ancestors of rules that lie deeper.
        """
        cached = self._may_cache.get(path)
        if cached is not None:
            return cached
        result = self._dir_may_contain(path)
        if len(self._may_cache) >= _CACHE_MAX:
            self._may_cache.clear()
        self._may_cache[path] = result
        return result

    def _dir_may_contain(self, path: str) -> bool:
        if self.is_auto_excluded(path):
            return False
        d = _split(path)
        n = len(d)
        subtree_excl: list[_Compiled] = []
        candidates: list[_Compiled] = []
        for c in self._compiled:
            covers_subtree = False
            if c.m == 0:
                covers_subtree = c.recursive
                anchored_here = n == 0
            elif c.m > n:
                # The rule lies deeper: D must match its first n components.
                if c.include and all(match(x) for match, x in zip(c.matchers, d)):
                    return True  # more specific than any exclude covering D
                continue
            else:
                if not c.prefix_matches(d):
                    continue
                assert c.last is not None
                if c.wild_last and c.recursive:
                    covers_subtree = any(c.last(x) for x in d[c.m - 1 :])
                    anchored_here = True  # a matching name may appear anywhere below
                else:
                    if not c.last(d[c.m - 1]):
                        continue
                    covers_subtree = c.recursive
                    anchored_here = c.m == n  # non-rec: only the files directly in D
            if c.include:
                if covers_subtree or anchored_here:
                    candidates.append(c)
            elif covers_subtree:
                subtree_excl.append(c)
        best_excl = _best(subtree_excl)
        if best_excl is None:
            return bool(candidates)
        return any(c.priority > best_excl.priority for c in candidates)

    def _context(self, parent: str) -> _DirContext:
        d = _split(parent)
        n = len(d)
        subtree: list[_Compiled] = []
        files: list[_Compiled] = []
        by_name: list[_Compiled] = []
        for c in self._compiled:
            if c.m == 0:
                if c.recursive:
                    subtree.append(c)
                elif n == 0:
                    files.append(c)
                continue
            if c.m > n + 1 or not c.prefix_matches(d):
                continue
            assert c.last is not None
            if c.m == n + 1:  # the anchor is the child itself
                by_name.append(c)
            elif c.wild_last and c.recursive:
                if any(c.last(x) for x in d[c.m - 1 :]):
                    subtree.append(c)
                else:
                    by_name.append(c)  # a matching child at any depth
            elif c.last(d[c.m - 1]):
                if c.recursive:
                    subtree.append(c)
                elif c.m == n:
                    files.append(c)
        ctx = _DirContext(
            subtree=_best(subtree),
            files=_best(files),
            by_name=tuple(sorted(by_name, key=lambda r: r.priority, reverse=True)),
        )
        if len(self._ctx_cache) >= _CACHE_MAX:
            self._ctx_cache.clear()
        self._ctx_cache[parent] = ctx
        return ctx

    # -- layout ---------------------------------------------------------------------------

    def base(self) -> str:
        """Longest common directory of the include rules' literal prefixes.

        The connection maps this directory to the target path. Computed from the rules
        alone (no stat): a single rule naming a file gives that file's path.
        """
        if self._base is None:
            raise RuleError("RULE_NO_INCLUDE", "replication set has no include rule")
        return self._base

    def watch_roots(self) -> list[str]:
        """Directories to watch (existing or not), none nested inside another: the
        literal prefixes of the include rules, minus auto-excluded ones."""
        prefixes = sorted(
            {r.literal_prefix for r in self.rules if r.include},
            key=lambda p: (p.count("/") if p != "/" else 0, p),
        )
        roots: list[str] = []
        for p in prefixes:
            if self.is_auto_excluded(p):
                continue
            if any(p == r or r == "/" or p.startswith(r + "/") for r in roots):
                continue
            roots.append(p)
        return sorted(roots)

    def __len__(self) -> int:
        return len(self.rules)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RuleSet):
            return NotImplemented
        return (self.rules, self.extra_excludes) == (other.rules, other.extra_excludes)

    def __hash__(self) -> int:
        return hash((self.rules, self.extra_excludes))

    def __repr__(self) -> str:
        return f"RuleSet({self.to_list()!r})"


def _common_dir(paths: Sequence[str]) -> str:
    split = [_split(p) for p in paths]
    common: list[str] = []
    for parts in zip(*split):
        if all(p == parts[0] for p in parts):
            common.append(parts[0])
        else:
            break
    return "/" + "/".join(common)
