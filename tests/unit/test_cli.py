"""`dtake` CLI against a scripted control socket: argv -> request, rendering, exit codes."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

from dtake.cli.main import main
from dtake.errors import DtakeError
from dtake.testing import FakeControl

STATUS = {
    "node": "alpha",
    "version": "0.1.0",
    "port": 6320,
    "uptime_s": 1.0,
    "connections": [
        {
            "id": 1,
            "repset": "rs",
            "target": "beta:6320",
            "state": "Started",
            "mirror_status": "42%",
            "replication_status": "Replicating",
            "target_data_state": "Mirroring",
            "queued_items": 7,
            "last_error": None,
        }
    ],
    "targets": [],
}


@pytest.fixture
def fake(tmp_path: Any) -> Iterator[FakeControl]:
    path = os.path.join(str(tmp_path), "ctl.sock")
    f = FakeControl(
        path,
        {
            "status": STATUS,
            "connect": lambda **a: {"id": 3, **a},
            "repset_delete": DtakeError(-130, "Replication set is in use: rs"),
            "wait": DtakeError(-1001, "connection 1 not idle after 1s"),
            "repset_create": lambda **a: {
                "name": a["name"],
                "rules": a["rules"],
                "base": "/data",
                "changed": True,
            },
        },
    )
    yield f
    f.close()


def test_connect_prints_id_and_sends_parsed_target(fake: FakeControl, capsys: Any) -> None:
    rc = main(
        [
            "--socket",
            fake.path,
            "connect",
            "rs",
            "beta:6400",
            "--target-path",
            "/copy",
            "--mirror",
            "checksum",
        ]
    )
    assert rc == 0
    assert capsys.readouterr().out.strip() == "3"
    cmd, args = fake.requests[-1]
    assert cmd == "connect"
    assert (args["host"], args["port"], args["target_path"], args["mirror"]) == (
        "beta",
        6400,
        "/copy",
        "checksum",
    )


def test_connect_json(fake: FakeControl, capsys: Any) -> None:
    rc = main(["connect", "--socket", fake.path, "--json", "rs", "beta", "--target-path", "/copy"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["id"] == 3 and out["port"] == 6320


def test_status_renders_seed_states(fake: FakeControl, capsys: Any) -> None:
    assert main(["--socket", fake.path, "status"]) == 0
    out = capsys.readouterr().out
    for word in ("Started", "42%", "Replicating", "Mirroring"):
        assert word in out


def test_refusal_prints_seed_code_and_exits_1(fake: FakeControl, capsys: Any) -> None:
    assert main(["--socket", fake.path, "repset", "delete", "rs"]) == 1
    assert "error -130" in capsys.readouterr().err


def test_refusal_json_has_code(fake: FakeControl, capsys: Any) -> None:
    assert main(["--socket", fake.path, "--json", "repset", "delete", "rs"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == -130


def test_wait_timeout_exit_code(fake: FakeControl) -> None:
    assert main(["--socket", fake.path, "wait", "1", "--idle", "--timeout", "1"]) == 3


def test_unreachable_service_exit_code(tmp_path: Any, capsys: Any) -> None:
    assert main(["--socket", os.path.join(str(tmp_path), "none.sock"), "status"]) == 4
    assert "cannot reach the dtake service" in capsys.readouterr().err


def test_socket_from_environment(fake: FakeControl, monkeypatch: Any) -> None:
    monkeypatch.setenv("DTAKE_SOCKET", fake.path)
    assert main(["status"]) == 0
    assert fake.requests[-1][0] == "status"


def test_repset_rules_are_passed_verbatim(fake: FakeControl) -> None:
    rules = ["/data inc, rec", "/data/tmp exc, rec", "/data/*.db inc"]
    argv = ["--socket", fake.path, "repset", "create", "rs"]
    for r in rules:
        argv += ["--rule", r]
    assert main(argv) == 0
    assert fake.requests[-1] == ("repset_create", {"name": "rs", "rules": rules, "replace": False})


@pytest.mark.parametrize(
    "bad", [["connect", "rs", "h:99999", "--target-path", "/x"], ["mirror", "bogus", "1"]]
)
def test_usage_errors_exit_2(bad: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(bad)
    assert exc.value.code == 2


def test_a_bad_target_port_says_why(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["connect", "rs", "beta:x", "--target-path", "/x"])
    assert "bad port 'x' in 'beta:x': a number from 1 to 65535" in capsys.readouterr().err


# ---------------------------------------------------------------------------- transmit
@pytest.fixture
def tx(tmp_path: Any) -> Iterator[FakeControl]:
    path = os.path.join(str(tmp_path), "ctl.sock")
    sched = {
        "enabled": True,
        "start_at": ["21:00"],
        "start_queued_mb": None,
        "stop_at": None,
        "stop_after_min": None,
        "window": ["21:00", "04:00"],
    }
    f = FakeControl(
        path,
        {
            "transmit": lambda **a: {"id": a["con_id"], "state": "Paused"},
            "transmit_schedule": lambda **a: {
                "target": a["target"],
                "schedule": sched,
                "active": False,
            },
        },
    )
    yield f
    f.close()


@pytest.mark.parametrize("action", ["start", "stop", "pause", "resume"])
def test_transmit_actions_take_a_connection_id(tx: FakeControl, capsys: Any, action: str) -> None:
    assert main(["--socket", tx.path, "transmit", action, "4"]) == 0
    assert tx.requests[-1] == ("transmit", {"con_id": 4, "action": action})
    assert capsys.readouterr().out.strip() == "connection 4: transmission Paused"


@pytest.mark.parametrize(
    "argv",
    [
        ["transmit", "schedule", "10.0.0.2", "set", "--start-at", "21:00"],
        ["transmit-schedule", "10.0.0.2", "set", "--start-at", "21:00"],  # hidden alias
    ],
)
def test_transmit_schedule_and_its_hidden_alias_send_the_same_request(
    tx: FakeControl, capsys: Any, argv: list[str]
) -> None:
    assert main(["--socket", tx.path, *argv, "--window", "21:00", "04:00"]) == 0
    cmd, args = tx.requests[-1]
    assert cmd == "transmit_schedule"
    assert args == {
        "target": "10.0.0.2",
        "action": "set",
        "start_at": ["21:00"],
        "start_queued_mb": None,
        "stop_at": None,
        "stop_after_min": None,
        "window": ["21:00", "04:00"],
    }
    out = capsys.readouterr().out
    assert out.startswith("10.0.0.2: schedule enabled, transmission waiting")
    assert "window 21:00-04:00" in out


@pytest.mark.parametrize(
    "argv",
    [
        ["--json", "transmit", "schedule", "7"],
        ["transmit", "--json", "schedule", "7"],
        ["transmit", "schedule", "7", "--json"],
    ],
)
def test_transmit_schedule_json_wherever_the_flag_is(
    tx: FakeControl, capsys: Any, argv: list[str]
) -> None:
    assert main(["--socket", tx.path, *argv]) == 0
    assert tx.requests[-1][1]["action"] == "show"
    assert json.loads(capsys.readouterr().out)["target"] == "7"


def test_transmit_help_lists_schedule_and_hides_the_alias(capsys: Any) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "transmit-schedule" not in top and "transmit " in top
    with pytest.raises(SystemExit):
        main(["transmit", "--help"])
    out = capsys.readouterr().out
    for action in ("start", "stop", "pause", "resume", "schedule"):
        assert f"    {action} " in out


def test_transmit_action_needs_a_numeric_id(tx: FakeControl, capsys: Any) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--socket", tx.path, "transmit", "stop", "10.0.0.2"])
    assert exc.value.code == 2
    assert tx.requests == []


# ---------------------------------------------------------------------- target discard
def test_target_discard_sends_the_connection_id(tmp_path: Any, capsys: Any) -> None:
    path = os.path.join(str(tmp_path), "ctl.sock")
    answer = {"conn_id": 5, "discarded_ops": 12, "discarded_bytes": 4096}
    f = FakeControl(
        path, {"target_discard": lambda **a: {**answer, "data_state": "Mirror Required"}}
    )
    try:
        assert main(["--socket", path, "target", "discard", "5"]) == 0
        assert f.requests[-1] == ("target_discard", {"con_id": 5})
        assert capsys.readouterr().out.strip() == "discarded 12 ops; data state Mirror Required"
        assert main(["--socket", path, "--json", "target", "discard", "5"]) == 0
        assert json.loads(capsys.readouterr().out)["discarded_ops"] == 12
    finally:
        f.close()
