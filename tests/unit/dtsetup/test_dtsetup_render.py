"""The service config is written without PyYAML for the usual values (a no-op apply then
need not import it): the bytes must be exactly those yaml.safe_dump writes, or an
upgrade of dtsetup would rewrite every host's config (and restart its service)."""

from __future__ import annotations

import dataclasses
import string

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from dtsetup import render
from dtsetup.model import Settings

BASE = Settings(
    section="Config",
    setup_type="DTNT",
    activation_codes=("A" * 24,),
    install_folder="/opt/dtake",
    memory_buffer_max_mb=128,
    disk_queue_folder="/var/lib/dtake/queue",
    disk_queue_max_mb=None,
    disk_free_min_mb=50,
    service_startup=True,
    port=6320,
    set_fw_port=True,
)

_SEGMENT = st.text(string.ascii_letters + string.digits + "_.-", min_size=1, max_size=40)
_ODD = st.text(min_size=1, max_size=20).map(lambda t: "/" + t)  # spaces, colons, quotes...


def _pyyaml(s: Settings) -> str:
    config = render.service_config(s)
    return render.HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


@settings(max_examples=300, deadline=None, database=None)
@given(
    folder=st.one_of(
        st.lists(_SEGMENT, min_size=1, max_size=6).map("/".join).map("/{}".format), _ODD
    ),
    memory=st.integers(1, 10**12),
    disk_max=st.one_of(st.none(), st.integers(0, 10**12)),
    free=st.integers(0, 10**12),
    port=st.integers(1024, 65535),
)
def test_config_bytes_equal_pyyaml(
    folder: str, memory: int, disk_max: int | None, free: int, port: int
) -> None:
    s = dataclasses.replace(
        BASE,
        disk_queue_folder=folder,
        memory_buffer_max_mb=memory,
        disk_queue_max_mb=disk_max,
        disk_free_min_mb=free,
        port=port,
    )
    assert render.service_config_text(s) == _pyyaml(s)


def test_usual_config_text() -> None:
    assert render.service_config_text(BASE) == _pyyaml(BASE)
    assert "  disk_max_mb: unlimited\n" in render.service_config_text(BASE)
    odd = dataclasses.replace(BASE, disk_queue_folder="/srv/dt queue: #1")
    assert render.service_config_text(odd) == _pyyaml(odd)  # PyYAML quotes this one
