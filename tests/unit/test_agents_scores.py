"""ReplicatedDisk / SourceConnection agent logic with the service and the pacemaker tools
scripted (ocfbase's seams): scores, online pending, what gets published and when."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "resource_agents"))

import ocfbase
import replicated_disk as rd
import source_connection as sc


def st(**kw: Any) -> dict[str, Any]:
    base = {
        "resource": "r",
        "node": "node2",
        "role": "Unpromoted",
        "generation": 3,
        "data": "good",
        "control": "",
        "reason": "",
        "status_text": "The status of all targets is OK.",
        "source_connected": False,
        "source_generation": 3,
        "queued_bytes": 0,
    }
    base.update(kw)
    return base


@pytest.mark.parametrize(
    ("kw", "cluster", "want"),
    [
        ({}, 3, rd.SCORE_CURRENT),
        ({"generation": 2}, 3, None),  # stale: never promoted automatically
        ({"data": "pending"}, 3, None),
        ({"data": "suspect"}, 3, None),
        ({"data": "queuing"}, 3, rd.SCORE_QUEUING),
        ({"generation": 0, "data": "unknown"}, 0, rd.SCORE_FRESH),  # first online
        ({"generation": 0, "data": "unknown"}, 1, None),  # wiped replica
        ({"role": "Promoted"}, 3, rd.SCORE_PROMOTED),
        ({"control": "accepted", "data": "pending", "generation": 1}, 5, rd.SCORE_ACCEPTED),
        ({"control": "failed"}, 3, None),
        ({"control": "testing"}, 3, None),
    ],
)
def test_promotion_score(kw: dict[str, Any], cluster: int, want: int | None) -> None:
    assert rd.promotion_score(st(**kw), cluster) == want


def test_pending_reason_names_text_and_controls() -> None:
    assert rd.pending_reason(st(), 3) is None
    why = rd.pending_reason(
        st(data="pending", status_text="Target node2 is pending. Data integrity not guaranteed."), 3
    )
    assert why is not None
    assert why.startswith("Target node2 is pending. Data integrity not guaranteed.")
    assert "dtake grd accept|test-data|fail r --node node2" in why
    stale = rd.pending_reason(st(generation=2), 3)
    assert stale is not None and "stale: generation 2" in stale


def test_parse_generations_and_peers() -> None:
    xml = (
        '<nodes><node id="1" uname="node1"><instance_attributes id="a">'
        '<nvpair id="x" name="dtake-r-gen" value="4"/></instance_attributes></node>'
        '<node id="2" uname="node2"/>'
        '<node id="3" uname="node3"><instance_attributes id="b">'
        '<nvpair id="y" name="dtake-other-gen" value="9"/>'
        '<nvpair id="z" name="dtake-r-gen" value="2"/></instance_attributes></node></nodes>'
    )
    assert rd.parse_generations(xml, "r") == {"node1": 4, "node3": 2}
    assert rd.parse_peers("1 node1 member\n2 node2 member\n3 node3 lost\n", "node2") == [
        "node1",
        "node3",
    ]


class FakeClient:
    def __init__(self, replies: dict[str, Any]) -> None:
        self.replies = replies
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        self.calls.append((cmd, args))
        r = self.replies[cmd]
        if isinstance(r, Exception):
            raise r
        return r(args) if callable(r) else r


class Tools:
    """Scripted pacemaker tools: argv -> (rc, stdout); records every call."""

    def __init__(self, cib: str = "<nodes/>", rc: int = 0) -> None:
        self.cib, self.rc = cib, rc
        self.calls: list[list[str]] = []

    def __call__(self, argv: Any, *, timeout: float = 30.0) -> tuple[int, str]:
        self.calls.append(list(argv))
        if argv[0] == "cibadmin":
            return self.rc, self.cib
        if argv[0] == "crm_node":
            return self.rc, "1 node1 member\n2 node2 member\n3 node3 member\n"
        return self.rc, ""


def agent(tmp_path: Path, replies: dict[str, Any], tools: Tools, **meta: str) -> rd.ReplicatedDisk:
    env = ocfbase.Env(
        "monitor",
        {"directory": "/srv/r"},
        {"interval": "10000", **meta},
        "r",
        "node2",
    )
    return rd.ReplicatedDisk(
        env,
        client=FakeClient(replies),  # type: ignore[arg-type]
        runner=tools,
        cache=ocfbase.StateCache("r", str(tmp_path)),
        sleep=lambda s: None,
    )


GEN_XML = (
    '<nodes><node id="1" uname="node1"><instance_attributes id="a">'
    '<nvpair id="x" name="dtake-r-gen" value="{g}"/></instance_attributes></node></nodes>'
)


def test_monitor_good_current_publishes_once(tmp_path: Path) -> None:
    tools = Tools(GEN_XML.format(g=3))
    a = agent(tmp_path, {"replica_status": st()}, tools)
    assert a.monitor() == ocfbase.OCF_SUCCESS
    score = [c for c in tools.calls if "-p" in c]
    assert score == [["crm_attribute", "-N", "node2", "-p", "r", "-l", "reboot", "-v", "1000"]]
    gen = [c for c in tools.calls if "dtake-r-gen" in c]
    assert gen and gen[0][-1] == "3" and "forever" in gen[0]
    # second monitor: nothing changed -> only the CIB read, no attribute writes
    tools.calls.clear()
    a2 = agent(tmp_path, {"replica_status": st()}, tools)
    assert a2.monitor() == ocfbase.OCF_SUCCESS
    assert [c[0] for c in tools.calls] == ["cibadmin"]


POS_XML = (
    "<nodes>"
    '<node id="1" uname="node1"><instance_attributes id="a">'
    '<nvpair id="x" name="dtake-r-gen" value="3"/>'
    '<nvpair id="p" name="dtake-r-pos" value="3:{p1}"/></instance_attributes></node>'
    '<node id="3" uname="node3"><instance_attributes id="b">'
    '<nvpair id="y" name="dtake-r-gen" value="2"/>'
    '<nvpair id="q" name="dtake-r-pos" value="2:900"/></instance_attributes></node>'
    "</nodes>"
)


def test_parse_positions_and_best_of_a_generation() -> None:
    pos = rd.parse_positions(POS_XML.format(p1=40), "r")
    assert pos == {"node1": (3, 40), "node3": (2, 900)}
    assert rd.best_position(pos, 3) == 40  # node3's 900 is of an older generation
    assert rd.best_position(pos, 4) is None


@pytest.mark.parametrize(
    ("mine", "theirs", "want"), [(50, 40, 1000), (40, 40, 1000), (30, 40, 999)]
)
def test_equal_generations_tie_on_the_position(
    tmp_path: Path, mine: int, theirs: int, want: int
) -> None:
    """Two good copies of generation 3, their source gone: the one that applied more after
    the generation's mirror gets the higher score; both stay promotable."""
    tools = Tools(POS_XML.format(p1=theirs))
    a = agent(tmp_path, {"replica_status": st(position=mine)}, tools)
    assert a.monitor() == ocfbase.OCF_SUCCESS
    published = [c for c in tools.calls if "dtake-r-pos" in c]
    assert published and published[0][-1] == f"3:{mine}" and "forever" in published[0]
    assert tools.calls.index(published[0]) < [c[0] for c in tools.calls].index("cibadmin")
    score = [c for c in tools.calls if "-p" in c]
    assert score[0][-1] == str(want)
    assert rd.promotion_score(st(position=mine), 3, theirs) == want


def test_a_receiving_copy_does_not_publish_its_position(tmp_path: Path) -> None:
    tools = Tools()
    a = agent(tmp_path, {"replica_status": st(source_connected=True, position=7)}, tools)
    assert a.monitor() == ocfbase.OCF_SUCCESS
    assert not [c for c in tools.calls if "dtake-r-pos" in c]


def test_monitor_in_band_generation_needs_no_fork(tmp_path: Path) -> None:
    tools = Tools()
    a = agent(tmp_path, {"replica_status": st(source_connected=True)}, tools)
    assert a.monitor() == ocfbase.OCF_SUCCESS
    assert "cibadmin" not in [c[0] for c in tools.calls]


def test_monitor_stale_is_online_pending(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tools = Tools(GEN_XML.format(g=5))
    a = agent(tmp_path, {"replica_status": st()}, tools)
    assert a.monitor() == ocfbase.OCF_DEGRADED
    assert ["crm_attribute", "-N", "node2", "-p", "r", "-l", "reboot", "-D"] in tools.calls
    err = capsys.readouterr().err
    assert "ocf-exit-reason:Target node2 is pending. Data integrity not guaranteed." in err
    assert "stale: generation 3, the cluster has seen 5" in err


def test_monitor_promoted_and_degraded_promoted(tmp_path: Path) -> None:
    tools = Tools()
    a = agent(tmp_path, {"replica_status": st(role="Promoted")}, tools)
    assert a.monitor() == ocfbase.OCF_RUNNING_PROMOTED
    bad = st(role="Promoted", status_text="Target node3 is pending. Data integrity not guaranteed.")
    a = agent(tmp_path, {"replica_status": bad}, tools)
    assert a.monitor() == ocfbase.OCF_DEGRADED_PROMOTED


def test_probe_never_fails(tmp_path: Path) -> None:
    down = ocfbase.ServiceError(-110, "not reachable", unreachable=True)
    env = ocfbase.Env("monitor", {"directory": "/srv/r"}, {"interval": "0"}, "r", "node2")
    a = rd.ReplicatedDisk(
        env,
        client=FakeClient({"replica_status": down}),  # type: ignore[arg-type]
        runner=Tools(),
        cache=ocfbase.StateCache("r", str(tmp_path)),
    )
    assert ocfbase.dispatch(env, {"monitor": a.monitor}, "") == ocfbase.OCF_NOT_RUNNING
    env2 = ocfbase.Env("monitor", {}, {"interval": "10000"}, "r", "node2")
    assert ocfbase.dispatch(env2, {"monitor": a.monitor}, "") == ocfbase.OCF_ERR_GENERIC


def test_promote_refuses_stale_and_passes_cluster_generation(tmp_path: Path) -> None:
    tools = Tools(GEN_XML.format(g=5))
    a = agent(tmp_path, {"replica_status": st(generation=4)}, tools)
    with pytest.raises(ocfbase.AgentError) as e:
        a.promote()
    assert e.value.rc == ocfbase.OCF_ERR_GENERIC
    seen: dict[str, Any] = {}

    def promote(args: dict[str, Any]) -> dict[str, Any]:
        seen.update(args)
        return st(role="Promoted", generation=6)

    a = agent(
        tmp_path,
        {"replica_status": st(generation=5), "replica_promote": promote},
        Tools(GEN_XML.format(g=5)),
        clone_max="3",
    )
    assert a.promote() == ocfbase.OCF_SUCCESS
    assert seen["cluster_generation"] == 5
    assert [p["node"] for p in seen["peers"]] == ["node1", "node3"]


def test_validate_all_owners_and_params(tmp_path: Path) -> None:
    tools = Tools()
    assert agent(tmp_path, {}, tools, clone_max="2").validate() == 0
    for meta, params in (
        ({"clone_max": "1"}, {}),
        ({"promoted_max": "2"}, {}),
        ({}, {"directory": "relative"}),
        ({}, {"mirror_type": "bogus"}),
    ):
        a = agent(tmp_path, {}, tools, **meta)
        a.env = ocfbase.Env("validate-all", {"directory": "/srv/r", **params}, meta, "r", "n")
        with pytest.raises(ocfbase.AgentError) as e:
            a.validate()
        assert e.value.rc == ocfbase.OCF_ERR_CONFIGURED


def test_meta_data_is_dtd_clean(capsys: pytest.CaptureFixture[str]) -> None:
    env = ocfbase.Env("meta-data", {}, {}, "r", "n")
    rd.ReplicatedDisk(env, client=FakeClient({}), runner=Tools()).meta_data()  # type: ignore[arg-type]
    xml = capsys.readouterr().out
    assert '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">' in xml
    assert "<version>1.1</version>" in xml
    assert "reloadable" not in xml and 'type="select"' not in xml
    assert 'role="Promoted"' in xml and 'role="Unpromoted"' in xml


@pytest.mark.parametrize(
    ("conn", "rc"),
    [
        ({"state": "Started", "mirror_status": "Idle", "target_data_state": "OK"}, 0),
        ({"state": "Paused", "mirror_status": "Idle", "target_data_state": "OK"}, 190),
        ({"state": "Started", "mirror_status": "Mirroring", "target_data_state": "Mirroring"}, 190),
        ({"state": "Error", "last_error": "refused", "target": "t:1"}, 1),
    ],
)
def test_source_connection_health(conn: dict[str, Any], rc: int) -> None:
    assert sc.connection_health(conn)[0] == rc


def test_monitor_imports_stay_thin() -> None:
    """The monitor path must not import jsonschema, yaml or the dtake package (DESIGN §6)."""
    import subprocess

    ra = Path(__file__).resolve().parents[2] / "resource_agents"
    code = (
        f"import sys; sys.path.insert(0, {str(ra)!r}); import replicated_disk, source_connection;"
        "bad = [m for m in ('jsonschema', 'yaml', 'dtake', 'subprocess', 'xml') if m in sys.modules];"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_calls_of_one_action_share_its_op_timeout() -> None:
    """SourceConnection start once ran past pacemaker's default 20 s: every call had the
    whole op timeout. Now the calls of one action share it (less a margin)."""
    env = ocfbase.Env("start", {}, {"timeout": "20000"}, "sc", "node1")
    client = FakeClient({"status": {"connections": []}})
    seen: list[float] = []
    client.call = lambda cmd, timeout=None, **a: seen.append(timeout) or {}  # type: ignore[method-assign]
    now = [100.0]
    agent = sc.SourceConnection(env, client=client)  # type: ignore[arg-type]
    agent._clock = lambda: now[0]
    agent.deadline = now[0] + 18.0
    agent._call("status")
    now[0] += 15.0
    agent._call("wait", timeout=60.0)
    now[0] += 10.0
    agent._call("disconnect")
    assert seen == [18.0, 3.0, 0.5]
    assert min(60.0, agent.remaining() / 2) == 0.0


def test_without_an_op_timeout_the_meta_data_timeout_applies() -> None:
    """ocf-tester passes no timeout: start keeps the meta-data's 120 s (its mirror wait
    60 s), as before the shared deadline."""
    assert sc.SourceConnection.default_timeout_s("start") == 120.0
    assert rd.ReplicatedDisk.default_timeout_s("monitor") == 30.0
    assert rd.ReplicatedDisk.default_timeout_s("nope") == 30.0
    env = ocfbase.Env("start", {}, {}, "sc", "node1")
    agent = sc.SourceConnection(env, client=FakeClient({}))  # type: ignore[arg-type]
    assert 117.0 < agent.remaining() <= 118.0
