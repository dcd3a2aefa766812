"""bench.common.settle_fs: the probe before a timed many-file benchmark run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import bench.common
from bench.common import probe_create_us, settle_fs


@pytest.fixture(autouse=True)
def _no_sync(monkeypatch: pytest.MonkeyPatch) -> None:
    # sync(2) flushes the whole machine's dirty data: seconds on a busy disk, and
    # nothing these tests check (the probe itself is real).
    monkeypatch.setattr(bench.common, "sync_fs", lambda: None)


def test_probe_creates_files_it_keeps(tmp_path: Path) -> None:
    us = probe_create_us(str(tmp_path), n=50)
    assert us > 0
    (probe,) = os.listdir(tmp_path)
    assert len(os.listdir(tmp_path / probe)) == 50  # kept: deleting would slow the next run


def test_settle_returns_at_once_when_creation_is_cheap(tmp_path: Path) -> None:
    res = settle_fs(str(tmp_path), fast_us=1e9)
    assert res["settled"] is True
    assert res["waited_s"] < 5.0  # no 5 s pause
    assert res["first_us"] == res["us"]


def test_settle_gives_up_and_says_so(tmp_path: Path) -> None:
    said: list[str] = []
    res = settle_fs(str(tmp_path), fast_us=0.0, max_wait_s=0.05, poll_s=0.01, log=said.append)
    assert res["settled"] is False
    assert said and "waiting" in said[0]
