"""The command line: exit codes, recap, --json, --check, redaction, usage errors."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path

from dtsetup.cli import run


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = run(list(argv), out, err)
    return code, out.getvalue(), err.getvalue()


def apply_args(path: Path, root: Path, *extra: str) -> list[str]:
    common = ["--root", str(root), "--host", "h", "--no-software", "--init", "none"]
    # an empty agents dir: the repo's resource_agents/ is filled by another issue
    common += ["--agents-dir", str(root.parent / "no-agents")]
    return ["apply", str(path), *common, *extra]


def test_validate_exit_codes(seed_ini: Path, full_ini: Callable[..., Path]) -> None:
    code, out, err = cli("validate", str(seed_ini))
    assert code == 0 and "valid (3 sections)" in out and "WINDOWS_PATH" in err
    assert cli("validate", "--strict", str(seed_ini))[0] == 1
    code, out, _ = cli("validate", "--json", str(full_ini(PORT="1")))
    data = json.loads(out)
    assert code == 1 and data["valid"] is False
    assert data["reports"][0] | {"file": None} == {
        "code": "BAD_VALUE",
        "severity": "error",
        "file": None,
        "line": 10,
        "section": "Config",
        "key": "PORT",
        "message": data["reports"][0]["message"],
    }


def test_apply_twice_exit_2_then_0(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/group").write_text("root:x:0:\ndtadmin:x:990:\ndtmon:x:991:\n")  # no groupadd
    path = full_ini()
    code, out, _ = cli(*apply_args(path, root))
    assert code == 2, out
    assert "RECAP h: ok=2 changed=4 failed=0 skipped=2" in out
    code, out, _ = cli(*apply_args(path, root))
    assert code == 0 and "changed=0 failed=0" in out
    # plan after a settings change: exit 2, nothing written
    before = (root / "etc/dtake/dtake.yaml").read_bytes()
    code, out, _ = cli(
        "plan",
        str(full_ini(PORT="7000")),
        "--root",
        str(root),
        "--host",
        "h",
        "--no-software",
        "--init",
        "none",
    )
    assert code == 2 and "+port: 7000" in out and "-port: 6320" in out
    assert (root / "etc/dtake/dtake.yaml").read_bytes() == before


def test_check_mode_writes_nothing(tmp_path: Path, full_ini: Callable[..., Path]) -> None:
    root = tmp_path / "root"
    root.mkdir()
    code, out, _ = cli(*apply_args(full_ini(), root, "--check", "--json"))
    data = json.loads(out)
    assert code == 2 and data["check"] is True and data["recap"]["changed"] > 0
    assert list(root.iterdir()) == []


def test_secrets_never_in_output(tmp_path: Path, full_ini: Callable[..., Path], code: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/group").write_text("dtadmin:x:990:\ndtmon:x:991:\n")
    path = full_ini()
    outputs = [cli(*apply_args(path, root, "--check", "--diff"))]
    outputs.append(cli(*apply_args(path, root, "--diff", "--json")))
    key = (root / "etc/dtake/authkey").read_text().strip()
    assert len(key) == 64
    outputs.append(cli(*apply_args(full_ini(PORT="7000"), root, "--diff")))
    outputs.append(
        cli("plan", str(path), "--root", str(root), "--host", "h", "--no-software", "--json")
    )
    outputs.append(cli("export", "--root", str(root)))
    outputs.append(cli("export", "--root", str(root), "--format", "yaml"))
    outputs.append(cli("validate", "--json", str(full_ini(DTACTIVATIONCODE=code + "!"))))
    for _, out, err in outputs:
        assert code not in out + err
        assert key not in out + err
    assert "<redacted>" in outputs[0][1]


def test_export_round_trip_and_secrets_file(
    tmp_path: Path, full_ini: Callable[..., Path], code: str
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "etc").mkdir()
    (root / "etc/group").write_text("dtadmin:x:990:\ndtmon:x:991:\n")
    assert cli(*apply_args(full_ini(PORT="7100", DISKQUEUEMAXSIZE="2048"), root))[0] == 2
    for fmt, name in (("ini", "x.ini"), ("yaml", "x.yaml")):
        target = tmp_path / name
        assert (
            cli(
                "export",
                "--root",
                str(root),
                "--format",
                fmt,
                "--include-secrets",
                "--output",
                str(target),
            )[0]
            == 0
        )
        assert target.stat().st_mode & 0o777 == 0o600
        assert code in target.read_text()
        # the export applies as a no-op: same settings back
        code_, out, _ = cli(*apply_args(target, root))
        assert code_ == 0, out
    assert cli("export", "--root", str(root), "--include-secrets")[0] == 1  # needs --output


def test_usage_errors_exit_1(tmp_path: Path) -> None:
    assert cli()[0] == 1
    assert cli("frobnicate")[0] == 1
    assert cli("apply")[0] == 1
    code, _, err = cli("export", "--root", str(tmp_path))
    assert code == 1 and "NOT_INSTALLED" in err


def test_uninstall_without_record_is_a_no_op(tmp_path: Path) -> None:
    code, _out, err = cli("uninstall", "--root", str(tmp_path))
    assert code == 0 and "NOT_INSTALLED" in err
