"""pytest fixtures for cluster tests: a real lab, started once per test module.

Use it from a conftest (``from lab.pytest_plugin import lab_cluster``) and::

    pytestmark = pytest.mark.cluster

    def test_failover(lab_cluster: Lab) -> None:          # 3 nodes (default)
        ...

    @pytest.mark.parametrize("lab_cluster", [2], indirect=True)
    def test_two_nodes(lab_cluster: Lab) -> None: ...    # or a module-level LAB_NODES = 2

Each module gets its own lab with a prefix unique to this pytest process, so
concurrent runs (other engineers, other modules) never meet. The lab is taken
down after the module, pass or fail, and again at session end for any lab left.
When the machine cannot run a lab (not root, packages missing), the fixture
*fails* under ``CI=true`` and skips otherwise, with the fix in the message.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest

from .core import Lab
from .settings import DEFAULT_N

__all__ = ["lab_cluster", "make_lab", "require_lab"]

_counter = itertools.count(1)
_live: list[Lab] = []


def _unique_prefix() -> str:
    """t<pid base36><n>: unique per pytest process and fixture instance, <= 10 chars."""
    pid, digits = os.getpid(), ""
    while pid:
        pid, r = divmod(pid, 36)
        digits = "0123456789abcdefghijklmnopqrstuvwxyz"[r] + digits
    return f"t{digits}{next(_counter)}"[:10]


def require_lab(lab: Lab) -> None:
    """Fail (CI) or skip (elsewhere) when the machine lacks what the lab needs."""
    problems = lab.preflight()
    if not problems:
        return
    msg = "lab/ cannot run here:\n" + "\n".join(f"  - {p}" for p in problems)
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(msg, pytrace=False)
    pytest.skip(msg)


def make_lab(n: int = DEFAULT_N, **kwargs: object) -> Lab:
    """A Lab with a unique prefix, torn down at session end if the test did not."""
    lab = Lab(_unique_prefix(), n, **kwargs)  # type: ignore[arg-type]
    _live.append(lab)
    return lab


@pytest.fixture(scope="module")
def lab_cluster(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A running N-node lab (N: indirect param, else module LAB_NODES, else 3)."""
    param = getattr(request, "param", None)
    n = int(param) if param is not None else int(getattr(request.module, "LAB_NODES", DEFAULT_N))
    lab = make_lab(n)
    require_lab(lab)
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    for lab in _live:
        try:
            lab.down()
        except Exception as e:  # report, never hide the tests' own result
            print(f"\nlab {lab.prefix}: down failed: {e}")
