"""Restoration connections: the set's rules moved onto the target's copy [L4709]."""

from __future__ import annotations

import os
from typing import Any

from dtake.cli.main import main
from dtake.rules import RuleSet
from dtake.service.restoreconn import map_rules
from dtake.testing import FakeControl


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


def test_cli_restore_id_and_restore_connect(tmp_path: Any, capsys: Any) -> None:
    """`restore ID` stays the one-pass restore; `restore connect` sends its options."""
    restored = {"files": 2, "bytes": 9, "dirs": 1, "links": 0, "orphans": 0, "orphans_mode": "off"}
    f = FakeControl(
        os.path.join(str(tmp_path), "ctl.sock"),
        {
            "restore": restored,
            "restore_connect": lambda **a: {
                "id": 4,
                "repset": f"({a['repset']}_Restore)",
                "target": "alpha:6400",
                "restore_from": "/copy",
                "restore_to": "/data",
            },
            "restore_release": {"id": 1, "target_data_state": "Restore Required"},
        },
    )
    try:
        assert main(["--socket", f.path, "restore", "3", "--mode", "full"]) == 0
        assert f.requests[-1] == ("restore", {"con_id": 3, "mode": "full", "orphans": None})
        argv = ["restore", "connect", "alpha:6400", "--repset", "rs", "--use-backup-repset"]
        assert main(["--socket", f.path, *argv, "--mirror", "full", "--orphans", "delete"]) == 0
        assert "4  (rs_Restore): /copy -> alpha:6400:/data" in capsys.readouterr().out
        cmd, args = f.requests[-1]
        assert cmd == "restore_connect"
        assert args == {
            "source": "alpha:6400",
            "repset": "rs",
            "from_path": None,
            "use_backup": True,
            "restore_repset": False,
            "mirror": "full",
            "orphans": "delete",
            "orphans_age_s": 0.0,
            "block": False,
        }
        assert main(["--socket", f.path, "restore", "release", "1"]) == 0
        assert f.requests[-1] == ("restore_release", {"con_id": 1})
        n = len(f.requests)
        assert main(["--socket", f.path, "restore", "connect", "alpha"]) == 2  # no --repset
        assert len(f.requests) == n
    finally:
        f.close()
