"""Typing, the schema and host selection: every key's edge values, blanks, Windows paths."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from dtsetup import model, schema

REPO = Path(__file__).resolve().parents[3]


def codes(result: model.LoadResult) -> list[str]:
    return [str(r.code) for r in result.reports]


def errors(result: model.LoadResult) -> list[tuple[str, str | None, int | None]]:
    return [(str(r.code), r.key, r.line) for r in result.reports if r.is_error]


def test_seed_sample_works_unchanged(seed_ini: Path) -> None:
    result = model.load(seed_ini, host="Alpha")
    assert result.ok
    assert codes(result) == ["WINDOWS_PATH"] * 6  # C:\Program Files\... in all three sections
    s = result.settings
    assert s is not None and s.section == "Alpha"
    assert (s.setup_type, s.port, s.memory_buffer_max_mb, s.disk_free_min_mb) == (
        "DTNT",
        6320,
        128,
        50,
    )
    assert s.disk_queue_max_mb is None  # UNLIMITED
    assert s.service_startup is True and s.set_fw_port is True
    assert s.install_folder == "/opt/dtake" and s.disk_queue_folder == "/var/lib/dtake/queue"
    assert s.activation_codes == ("123456789012345678901234",)


def test_strict_makes_windows_paths_errors(seed_ini: Path) -> None:
    result = model.load(seed_ini, host="Alpha", strict=True)
    assert not result.ok
    assert errors(result)[0] == ("WINDOWS_PATH", "DOUBLETAKEFOLDER", 7)
    assert len(errors(result)) == 6


@pytest.mark.parametrize(
    ("host", "section"),
    [
        ("Alpha", "Alpha"),
        ("alpha", "Config"),
        ("ALPHA", "Config"),
        ("Beta", "Beta"),
        ("Gamma", "Config"),
        ("Beta.example.com", "Beta"),
    ],
)
def test_section_selection_is_case_sensitive(seed_ini: Path, host: str, section: str) -> None:
    result = model.load(seed_ini, host=host)
    assert result.settings is not None and result.settings.section == section


def test_no_section_for_host(write_file: Callable[..., Path], code: str) -> None:
    path = write_file(f"[Alpha]\nDTACTIVATIONCODE={code}\n")
    result = model.load(path, host="beta")
    assert "NO_SECTION_FOR_HOST" in codes(result)
    assert result.settings is None


def test_machine_section_does_not_merge_config(write_file: Callable[..., Path], code: str) -> None:
    path = write_file(
        f"[Config]\nPORT=7000\nDTACTIVATIONCODE={code}\n[Alpha]\nDTACTIVATIONCODE={code}\n"
    )
    result = model.load(path, host="Alpha")
    assert result.settings is not None and result.settings.port == 6320  # default, not Config's


GOOD = [
    ("PORT", "1024", "port", 1024),
    ("PORT", "65535", "port", 65535),
    ("PORT", " 6320 ", "port", 6320),
    ("QMEMORYBUFFERMAX", "1", "memory_buffer_max_mb", 1),
    ("DISKQUEUEMAXSIZE", "unlimited", "disk_queue_max_mb", None),
    ("DISKQUEUEMAXSIZE", "0", "disk_queue_max_mb", 0),
    ("DISKQUEUEMAXSIZE", "4096", "disk_queue_max_mb", 4096),
    ("DISKFREESPACEMIN", "0", "disk_free_min_mb", 0),
    ("DTSERVICESTARTUP", "N", "service_startup", False),
    ("DTSERVICESTARTUP", "0", "service_startup", False),
    ("DTSERVICESTARTUP", "y", "service_startup", True),
    ("SET_FWPORT", "0", "set_fw_port", False),
    ("SET_FWPORT", "1", "set_fw_port", True),
    ("DTSETUPTYPE", "dtso", "setup_type", "DTSO"),
    ("DOUBLETAKEFOLDER", '"/srv/dt take"', "install_folder", "/srv/dt take"),
]


@pytest.mark.parametrize(("key", "raw", "attr", "expected"), GOOD)
def test_good_values(
    full_ini: Callable[..., Path], key: str, raw: str, attr: str, expected: object
) -> None:
    result = model.load(full_ini(**{key: raw}), host="h")
    assert result.ok, result.reports
    assert getattr(result.settings, attr) == expected


BAD = [
    ("PORT", "1023"),
    ("PORT", "65536"),
    ("PORT", "63 20"),
    ("PORT", "0x18b0"),
    ("QMEMORYBUFFERMAX", "0"),
    ("QMEMORYBUFFERMAX", "12.5"),
    ("DISKQUEUEMAXSIZE", "-1"),
    ("DISKQUEUEMAXSIZE", "unlimit"),
    ("DISKFREESPACEMIN", "-5"),
    ("DTSERVICESTARTUP", "yes"),
    ("DTSERVICESTARTUP", "2"),
    ("SET_FWPORT", "true"),
    ("DTSETUPTYPE", "DTXX"),
    ("DOUBLETAKEFOLDER", "relative/path"),
    ("DOUBLETAKEFOLDER", "/"),
    ("DISKQUEUEFOLDER", "/var/../etc"),
    ("DTACTIVATIONCODE", "12345678901234567890123"),  # 23
    ("DTACTIVATIONCODE", "1234567890123456789012345"),  # 25
    ("DTACTIVATIONCODE", "12345678901234567890123!"),
]


@pytest.mark.parametrize(("key", "raw"), BAD)
def test_bad_values_are_located(full_ini: Callable[..., Path], key: str, raw: str) -> None:
    path = full_ini(**{key: raw})
    result = model.load(path, host="h")
    assert errors(result) == [("BAD_VALUE", key, list(model.KEYS).index(key) + 2)]
    report = result.reports[0]
    assert report.file == str(path) and report.section == "Config"


def test_several_activation_codes(full_ini: Callable[..., Path], code: str) -> None:
    other = "Z" * 24
    result = model.load(full_ini(DTACTIVATIONCODE=f"{code};{other}; "), host="h")
    assert result.settings is not None and result.settings.activation_codes == (code, other)
    bad = model.load(full_ini(DTACTIVATIONCODE=f"{code};short"), host="h")
    assert errors(bad) == [("BAD_VALUE", "DTACTIVATIONCODE", 3)]


def test_secret_never_in_messages(full_ini: Callable[..., Path]) -> None:
    secret = "SECRETSECRETSECRETSECRE!"
    result = model.load(full_ini(DTACTIVATIONCODE=secret), host="h")
    assert not result.ok
    assert all(secret not in r.message for r in result.reports)
    assert all(secret not in repr(r) for r in result.reports)


def test_blank_values_fall_back_with_warning(full_ini: Callable[..., Path]) -> None:
    result = model.load(full_ini(PORT="", DISKQUEUEFOLDER='""', SET_FWPORT=""), host="h")
    assert result.ok
    assert codes(result) == ["BLANK_VALUE"] * 3
    s = result.settings
    assert s is not None and s.port == 6320 and s.disk_queue_folder == "/var/lib/dtake/queue"


def test_missing_keys_warn_and_default(full_ini: Callable[..., Path]) -> None:
    result = model.load(full_ini(PORT=None, QMEMORYBUFFERMAX=None), host="h")
    assert result.ok
    assert sorted(codes(result)) == ["MISSING_KEY", "MISSING_KEY"]
    assert result.settings is not None and result.settings.memory_buffer_max_mb == 512


def test_activation_code_required_unless_client_only(full_ini: Callable[..., Path]) -> None:
    result = model.load(full_ini(DTACTIVATIONCODE=""), host="h")
    assert [c for c in codes(result) if c != "BLANK_VALUE"] == ["MISSING_ACTIVATION_CODE"]
    client = model.load(full_ini(DTACTIVATIONCODE=None, DTSETUPTYPE="DTCO"), host="h")
    assert client.ok
    assert "SERVICE_STARTUP_IGNORED" in codes(client)
    assert client.settings is not None and not client.settings.server


def test_unknown_key_and_everything_at_once(write_file: Callable[..., Path], code: str) -> None:
    path = write_file(
        "[Config]\n"
        f"DTACTIVATIONCODE={code}\n"
        "PORT=80\n"
        "Colour=blue\n"
        "PORT=81\n"
        "[Alpha]\n"
        "DTSETUPTYPE=nope\n"
        "DISKQUEUEMAXSIZE=lots\n"
    )
    result = model.load(path, host="Alpha")
    assert sorted(errors(result), key=lambda e: e[2] or 0) == [
        ("BAD_VALUE", "PORT", 3),
        ("UNKNOWN_KEY", "COLOUR", 4),
        ("DUPLICATE_KEY", "PORT", 5),
        ("MISSING_ACTIVATION_CODE", "DTACTIVATIONCODE", 6),
        ("BAD_VALUE", "DTSETUPTYPE", 7),
        ("BAD_VALUE", "DISKQUEUEMAXSIZE", 8),
    ]
    assert result.settings is None


def test_published_schema_is_generated_from_code() -> None:
    published = json.loads((REPO / "schemas" / "dtsetup.schema.json").read_text())
    assert published == json.loads(schema.dump())
    assert {"DTACTIVATIONCODE"} == schema.SECRET_KEYS
    assert set(published["$defs"]["section"]["propertyNames"]["enum"]) == set(model.KEYS)


def test_validate_does_not_import_jsonschema_at_cli_import() -> None:
    import subprocess
    import sys

    code = "import sys, dtsetup.cli; print('jsonschema' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
