"""The cluster key file, provided (--auth-key-file) or already on the host: exactly 64
lowercase hex characters and at most one newline, as the service reads it
(dtake.protocol.auth.parse_key). Regression for the ``$`` -> ``\\Z`` fix in
dtsetup/steps/key.py: ``$`` also matches before a final newline, so "KEY\\n\\n" passed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dtsetup import actions, model
from dtsetup.runner import ScriptedRunner
from dtsetup.steps.base import Context, StepError
from dtsetup.steps.key import AuthKeyStep, normalize_key, valid_key
from dtsetup.txn import Transaction

KEY = "0123456789abcdef" * 4  # 64 lowercase hex characters


def _ctx(tmp_path: Path, ini: Path) -> Context:
    loaded = model.load(ini, host="h")
    assert loaded.settings is not None
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    return Context(root=root, settings=loaded.settings, runner=ScriptedRunner(), previous=None)


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (KEY + "\n", KEY + "\n"),  # as `dtake keygen` writes it: taken byte for byte
        (KEY, KEY + "\n"),  # no final newline (echo -n, an editor): same key, newline added
    ],
)
def test_provided_key_accepted(
    tmp_path: Path, full_ini: Callable[..., Path], given: str, stored: str
) -> None:
    provided = tmp_path / "cluster.key"
    provided.write_bytes(given.encode())
    ctx = _ctx(tmp_path, full_ini())
    step = AuthKeyStep(provided=provided)
    assert step.plan(ctx).changed
    step.apply(ctx, Transaction())
    assert (ctx.root / "etc/dtake/authkey").read_bytes() == stored.encode()
    assert (ctx.root / "etc/dtake/authkey").stat().st_mode & 0o777 == 0o600
    assert not AuthKeyStep(provided=provided).plan(ctx).changed  # converged


@pytest.mark.parametrize(
    "given",
    [
        KEY + "\n\n",  # the regression: passed the old ^...\n$ pattern
        KEY + "\r\n",  # a Windows-made file
        KEY[:32] + "\n" + KEY[32:] + "\n",  # a newline inside, with a final newline
        KEY[:32] + "\n" + KEY[32:],  # a newline inside, without
        "\n" + KEY,
        " " + KEY + "\n",
        KEY.upper() + "\n",
        KEY[:-1] + "\n",
        "",
    ],
    ids=[
        "two-newlines",
        "crlf",
        "embedded-nl",
        "embedded-nl-no-final",
        "leading-nl",
        "space",
        "upper",
        "63-chars",
        "empty",
    ],
)
def test_provided_key_rejected_without_writing(
    tmp_path: Path, full_ini: Callable[..., Path], given: str
) -> None:
    provided = tmp_path / "cluster.key"
    provided.write_bytes(given.encode())
    with pytest.raises(StepError) as caught:
        AuthKeyStep(provided=provided).plan(_ctx(tmp_path, full_ini()))
    assert caught.value.code == "BAD_AUTH_KEY"
    assert KEY[:16] not in str(caught.value)  # the key is never echoed


def test_rejected_key_fails_apply_and_changes_nothing(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    provided = tmp_path / "cluster.key"
    provided.write_text(KEY + "\n\n")
    root = tmp_path / "root"
    root.mkdir()
    opts = actions.ApplyOptions(
        host="h", root=root, no_software=True, init="none", firewall="none",
        agents_dir=tmp_path / "none", auth_key_file=provided,
    )  # fmt: skip
    result = actions.apply(full_ini(), opts)
    assert result.exit_code == 1
    assert [str(r.code) for r in result.reports if r.is_error] == ["BAD_AUTH_KEY"]
    assert list(root.iterdir()) == []  # a plan failed: nothing applied


def test_live_key_without_newline_is_kept_not_rotated(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    ctx = _ctx(tmp_path, full_ini())
    live = ctx.root / "etc/dtake/authkey"
    live.parent.mkdir(parents=True)
    live.write_text(KEY)
    live.chmod(0o600)
    step = AuthKeyStep()
    change = step.plan(ctx)
    assert change.changed and change.summary == "update /etc/dtake/authkey"
    step.apply(ctx, Transaction())
    assert live.read_text() == KEY + "\n"  # the same key: the cluster keeps working


def test_live_key_with_two_newlines_is_replaced(
    tmp_path: Path, full_ini: Callable[..., Path]
) -> None:
    """Not a key for the service either (parse_key refuses it): a new one is generated."""
    ctx = _ctx(tmp_path, full_ini())
    live = ctx.root / "etc/dtake/authkey"
    live.parent.mkdir(parents=True)
    live.write_text(KEY + "\n\n")
    AuthKeyStep().apply(ctx, Transaction())
    new = live.read_bytes()
    assert valid_key(new) and new != (KEY + "\n").encode()


def test_normalize_and_valid() -> None:
    assert normalize_key(KEY.encode()) == (KEY + "\n").encode()
    assert normalize_key((KEY + "\n").encode()) == (KEY + "\n").encode()
    assert normalize_key((KEY + "\n\n").encode()) is None
    assert normalize_key(None) is None
    assert valid_key((KEY + "\n").encode())
    assert not valid_key(KEY.encode())  # valid as input, but not as dtsetup writes it
    assert not valid_key((KEY + "\n\n").encode())
