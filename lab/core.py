"""The lab: N corosync/pacemaker nodes on one machine, each a set of namespaces.

State lives in one directory (``state_dir``, default ``/run/dtake-lab-<prefix>``)::

    .dtake-lab              marker: `down` deletes only a directory holding it
    state.json              every PID the lab started (with its start time) and
                            every netns it created, written before/after each step
    corosync.conf authkey cib-seed.xml
    ssh/                    lab key (id_ed25519), known_hosts, ssh_config
    nodes/<node>/           spec.json, init.log, private dirs (see settings.PRIVATE_DIRS),
                            overlay upper/work dirs, spawn logs

Because everything is recorded before it is used, ``down`` works from the
state alone, also after the process that ran ``up`` crashed.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Network
from typing import Any, TypeVar

from . import netns, preflight
from .cluster import ClusterStatus, corosync_conf, parse_crm_mon, seed_cib
from .errors import LabError, LabTimeout, NodeCommandError, NodeDown, PreflightError
from .proc import Proc, children, launch
from .settings import (
    DC_DEADTIME,
    DEFAULT_N,
    DEFAULT_PREFIX,
    ENV_PREFIX,
    HOST_NETNS_DIR,
    MARKER,
    MAX_NODES,
    NODE_ENV,
    OVERLAYS,
    PRIVATE_DIRS,
    RUN_DIRS,
    TOKEN_MS,
    default_state_dir,
    default_subnet,
    validate_prefix,
)

__all__ = ["Lab", "LabStatus", "NodeStatus", "Spawned", "UpReport"]

T = TypeVar("T")
HERE = os.path.dirname(os.path.abspath(__file__))
SSHD_CONFIG = "/etc/ssh/dtake-lab-sshd_config"
# name -> (argv, log file inside the node)
SERVICES: dict[str, tuple[list[str], str]] = {
    "sshd": (["/usr/sbin/sshd", "-D", "-e", "-f", SSHD_CONFIG], "/var/log/dtake-lab-sshd.log"),
    "corosync": (["corosync", "-f"], "/var/log/corosync/corosync.out"),
    "pacemakerd": (["pacemakerd"], "/var/log/pacemaker/pacemakerd.out"),
}
# Starts a service unless its recorded pid still runs (inside the node: the
# node's init reaps at once, so kill -0 is truthful there).
_START_SH = r"""
pidf=/run/dtake-lab/$1.pid log=$2; shift 2
if [ -s "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; then exit 0; fi
setsid "$@" </dev/null >>"$log" 2>&1 &
echo $! >"$pidf"
"""
_STATUS_SH = r"""
for s in "$@"; do
  p=$(cat /run/dtake-lab/$s.pid 2>/dev/null)
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then echo "$s up $p"; else echo "$s down -"; fi
done
"""


@dataclass(frozen=True)
class UpReport:
    already_up: bool
    stages: list[tuple[str, float]]
    total: float

    def render(self) -> str:
        lines = [f"  {name:<28}{secs:6.2f} s" for name, secs in self.stages]
        lines.append(f"  {'total':<28}{self.total:6.2f} s")
        return "\n".join(lines)


@dataclass(frozen=True)
class NodeStatus:
    name: str
    address: str
    running: bool
    init_pid: int | None
    services: dict[str, bool]


@dataclass(frozen=True)
class LabStatus:
    prefix: str
    state_dir: str
    n: int
    nodes: list[NodeStatus]
    cluster: ClusterStatus | None

    @property
    def up(self) -> bool:
        return self.n > 0


@dataclass
class Spawned:
    """A long-running process inside a node (e.g. ``dtake serve``), tracked by the lab.

    ``outer`` is the host-side ``nsenter``; ``inner`` the command itself (its host PID).
    It ends when the node is killed, when :meth:`stop` is called, or on ``down``.
    """

    lab: Lab = field(repr=False)
    node: str
    name: str
    outer: Proc
    inner: Proc | None
    log: str

    @property
    def pid(self) -> int | None:
        return None if self.inner is None else self.inner.pid

    def running(self) -> bool:
        return self.inner is not None and self.inner.running()

    def read_log(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self, *, timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
        """SIG to the process, SIGKILL after TIMEOUT; always forgotten by the lab after."""
        if self.inner is not None and self.inner.signal(sig) and not self.inner.wait_gone(timeout):
            self.inner.signal(signal.SIGKILL)
            self.inner.wait_gone(5)
        if not self.outer.wait_gone(2):
            self.outer.signal(signal.SIGKILL)
            self.outer.wait_gone(5)
        self.lab._forget_spawned(self.node, self.name)


class Lab:
    """An N-node corosync + pacemaker cluster on this machine.

    ``prefix`` names the lab's netns (``<prefix>-hub``, ``<prefix>-node1``...) and its
    default state dir; two labs with different prefixes coexist. ``None`` for
    prefix/state_dir/subnet means: environment variable (``DTAKE_LAB_PREFIX``,
    ``DTAKE_LAB_STATE_DIR``, ``DTAKE_LAB_SUBNET``), then the default.
    """

    def __init__(
        self,
        prefix: str | None = None,
        n: int = DEFAULT_N,
        *,
        state_dir: str | None = None,
        subnet: str | None = None,
        token_ms: int = TOKEN_MS,
        dc_deadtime: str = DC_DEADTIME,
        crypto: bool = False,
        fence_dummy: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.prefix = validate_prefix(prefix or os.environ.get(ENV_PREFIX) or DEFAULT_PREFIX)
        if not 1 <= n <= MAX_NODES:
            raise ValueError(f"n must be 1..{MAX_NODES}, got {n}")
        self.n = n
        self.state_dir = os.path.abspath(state_dir or default_state_dir(self.prefix))
        self.network = IPv4Network(subnet or default_subnet(self.prefix))
        if not self.network.subnet_of(IPv4Network("198.18.0.0/15")):
            raise ValueError(f"lab subnet {self.network} is not in 198.18.0.0/15 (RFC 2544)")
        self.token_ms = token_ms
        self.dc_deadtime = dc_deadtime
        self.crypto = crypto
        self.fence_dummy = fence_dummy
        self._log = log or (lambda _msg: None)
        self._lock_fd: int | None = None
        self._lock_depth = 0
        self._load()

    def __enter__(self) -> Lab:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------------ names
    @property
    def hub(self) -> str:
        return f"{self.prefix}-hub"

    @property
    def nodes(self) -> list[str]:
        """Node names of the running lab (or of the lab ``up`` would build)."""
        return [f"node{i}" for i in range(1, (self._state.get("n") or self.n) + 1)]

    def netns_of(self, node: str) -> str:
        return f"{self.prefix}-{node}"

    def index(self, node: str) -> int:
        if not (node.startswith("node") and node[4:].isdigit()):
            raise LabError(f"no such node {node!r} (nodes are node1..node{MAX_NODES})")
        i = int(node[4:])
        if not 1 <= i <= len(self.nodes):
            raise LabError(f"no such node {node!r} in this lab ({', '.join(self.nodes)})")
        return i

    def address(self, node: str) -> str:
        return str(self.network.network_address + 10 + self.index(node))

    @property
    def hub_address(self) -> str:
        return str(self.network.network_address + 254)

    def node_dir(self, node: str) -> str:
        return os.path.join(self.state_dir, "nodes", node)

    def host_path(self, node: str, path: str) -> str:
        """Where PATH inside NODE lives on the host, for the node's private dirs (/srv, /etc/dtake...)."""
        path = os.path.normpath(path)
        for inside, name in sorted(PRIVATE_DIRS.items(), key=lambda kv: -len(kv[0])):
            if path == inside or path.startswith(inside + "/"):
                return os.path.join(self.node_dir(node), name) + path[len(inside) :]
        raise LabError(f"{path} is not in a private directory of {node}: {sorted(PRIVATE_DIRS)}")

    @property
    def ssh_dir(self) -> str:
        return os.path.join(self.state_dir, "ssh")

    @property
    def ssh_key(self) -> str:
        """Private key that logs in as root on every node."""
        return os.path.join(self.ssh_dir, "id_ed25519")

    @property
    def ssh_config(self) -> str:
        """ssh_config for ``ssh -F`` / Fabric (``Host node1`` ...; relays through the hub netns)."""
        return os.path.join(self.ssh_dir, "ssh_config")

    # ------------------------------------------------------------------ state
    @property
    def _state_file(self) -> str:
        return os.path.join(self.state_dir, "state.json")

    def _load(self) -> None:
        try:
            with open(self._state_file, encoding="utf-8") as f:
                self._state: dict[str, Any] = json.load(f)
        except FileNotFoundError:
            self._state = {}

    def _save(self) -> None:
        tmp = self._state_file + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self._state, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._state_file)

    def _node_rec(self, node: str) -> dict[str, Any]:
        recs: dict[str, dict[str, Any]] = self._state.setdefault("nodes", {})
        return recs.setdefault(node, {})

    def _init_proc(self, node: str) -> Proc | None:
        v = self._state.get("nodes", {}).get(node, {}).get("init")
        return Proc.from_json(v) if v else None

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialise mutations of one lab across processes (flock on <state_dir>.lock)."""
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        path = self.state_dir + ".lock"
        os.makedirs(os.path.dirname(path), exist_ok=True)
        deadline = time.monotonic() + 600
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        os.close(fd)
                        raise LabTimeout(f"another lab command holds {path}") from None
                    time.sleep(0.1)
            # `down` unlinks the lock file: make sure we hold the current one
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._lock_fd, self._lock_depth = fd, 1
        try:
            self._load()
            yield
        finally:
            self._lock_depth = 0
            self._lock_fd = None
            os.close(fd)

    # ------------------------------------------------------------------ checks
    def preflight(self) -> list[str]:
        """Problems that stop the lab on this machine, each naming its fix."""
        return preflight.check(self.state_dir)

    def running(self, node: str) -> bool:
        """Is NODE's pid-namespace init alive (the node is powered on)?"""
        p = self._init_proc(node)
        return p is not None and p.running()

    # ------------------------------------------------------------------ exec
    def _nsenter(self, node: str, cwd: str) -> list[str]:
        p = self._init_proc(node)
        if p is None or not p.running():
            raise NodeDown(f"{node} is not running (lab {self.prefix})")
        return ["nsenter", "-t", str(p.pid), "-m", "-u", "-i", "-n", "-p", f"--wdns={cwd}", "--"]

    @staticmethod
    def _env(env: Mapping[str, str] | None) -> dict[str, str]:
        out = dict(NODE_ENV)
        if "TERM" in os.environ:
            out["TERM"] = os.environ["TERM"]
        out.update(env or {})
        return out

    def exec(
        self,
        node: str,
        cmd: str | Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> subprocess.CompletedProcess[str]:
        """Run CMD inside NODE (all its namespaces) and wait; a str CMD goes through ``sh -c``.

        The environment is the lab's clean one (PATH, HOME, LANG) plus ENV. On a
        non-zero exit (with CHECK) or on TIMEOUT, raises NodeCommandError with the
        output attached; the command's whole process group is killed on timeout.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        p = subprocess.Popen(
            [*self._nsenter(node, cwd), *argv],
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self._env(env),
            start_new_session=True,
        )
        try:
            out, err = p.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            out, err = p.communicate()
            res = subprocess.CompletedProcess(cmd, -9, out, err)
            raise NodeCommandError(node, res, timed_out=True) from None
        res = subprocess.CompletedProcess(cmd, p.returncode, out, err)
        if check and p.returncode != 0:
            raise NodeCommandError(node, res)
        return res

    def write_file(self, node: str, path: str, data: str, *, mode: int = 0o644) -> None:
        """Write DATA to PATH inside NODE (any path the node sees; parent dirs created)."""
        script = 'mkdir -p "$(dirname "$1")" && cat >"$1" && chmod "$2" "$1"'
        self.exec(node, ["sh", "-c", script, "sh", path, f"{mode:o}"], input=data)

    def read_file(self, node: str, path: str) -> str:
        return self.exec(node, ["cat", path]).stdout

    def interactive(self, node: str, cmd: Sequence[str]) -> int:
        """Run CMD inside NODE on the caller's terminal (CLI `exec`); returns its exit status."""
        return subprocess.call([*self._nsenter(node, "/"), *cmd], env=self._env(None))

    def spawn(
        self,
        node: str,
        cmd: str | Sequence[str],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str = "/",
    ) -> Spawned:
        """Start a long-running CMD inside NODE in the background; the lab tracks and ends it.

        Output goes to ``<state>/nodes/<node>/spawn/<name>.log``. NAME (default: the
        program's base name) must be unique per node while it runs.
        """
        argv = ["sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        name = name or os.path.basename(cmd.split()[0] if isinstance(cmd, str) else argv[0])
        with self._locked():
            recs = self._node_rec(node).setdefault("spawned", {})
            old = recs.get(name)
            if old and Proc.from_json(old["outer"]).running():
                raise LabError(f"{node}: a process named {name!r} is already spawned")
            logdir = os.path.join(self.node_dir(node), "spawn")
            os.makedirs(logdir, exist_ok=True)
            log = os.path.join(logdir, f"{name}.log")
            outer = launch([*self._nsenter(node, cwd), *argv], env=self._env(env), log=log)
            inner: Proc | None = None
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and outer.running():
                kids = children(outer.pid)
                if kids:
                    inner = Proc.of(kids[0])
                    break
                time.sleep(0.01)
            recs[name] = {
                "outer": outer.to_json(),
                "inner": inner.to_json() if inner else None,
                "log": log,
            }
            self._save()
        return Spawned(self, node, name, outer, inner, log)

    def spawned(self, node: str) -> list[Spawned]:
        """The processes spawned in NODE that the lab still tracks."""
        out = []
        for name, rec in self._state.get("nodes", {}).get(node, {}).get("spawned", {}).items():
            inner = Proc.from_json(rec["inner"]) if rec.get("inner") else None
            out.append(Spawned(self, node, name, Proc.from_json(rec["outer"]), inner, rec["log"]))
        return out

    def _forget_spawned(self, node: str, name: str) -> None:
        with self._locked():
            self._node_rec(node).get("spawned", {}).pop(name, None)
            self._save()

    def connect(self, node: str, port: int = 22, *, timeout: float = 5.0) -> socket.socket:
        """A TCP socket to NODE:PORT opened from the hub netns (e.g. paramiko ``sock=``)."""
        return netns.open_socket(self.hub, self.address(node), port, timeout=timeout)

    # ------------------------------------------------------------------ cluster view
    def first_running(self) -> str:
        for node in self.nodes:
            if self.running(node):
                return node
        raise NodeDown(f"no node of lab {self.prefix} is running")

    def crm_mon_xml(self, node: str | None = None, *, timeout: float = 30.0) -> str:
        """``crm_mon --output-as xml`` as seen from NODE (default: the first running node)."""
        node = node or self.first_running()
        return self.exec(node, ["crm_mon", "--output-as", "xml"], timeout=timeout).stdout

    def cluster_status(self, node: str | None = None) -> ClusterStatus:
        return parse_crm_mon(self.crm_mon_xml(node))

    def wait_for(
        self,
        predicate: Callable[[], T | None],
        timeout: float,
        *,
        interval: float = 0.2,
        what: str = "condition",
    ) -> T:
        """Call PREDICATE until it returns something truthy (returned) or TIMEOUT runs out.

        A LabError raised by PREDICATE (a node not answering yet) counts as "not yet";
        the last one is named in the LabTimeout.
        """
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while True:
            try:
                v = predicate()
                if v:
                    return v
            except LabError as e:
                last = e
            if time.monotonic() >= deadline:
                raise LabTimeout(
                    f"{what}: not reached within {timeout:g} s"
                    + (f" (last error: {last})" if last else "")
                )
            time.sleep(interval)

    def wait_cluster(
        self,
        nodes: Sequence[str] | None = None,
        *,
        via: str | None = None,
        timeout: float = 120.0,
        settle: bool = True,
    ) -> ClusterStatus:
        """Wait until VIA sees a quorate DC and every one of NODES (default: all) online.

        With SETTLE (default), then also until the cluster has nothing left to do
        (``crm_resource --wait``): a node that rejoins after a kill brings its stale
        resource history along for a moment ("active on 2 nodes") until it is probed.
        """
        want = sorted(nodes if nodes is not None else self.nodes)
        deadline = time.monotonic() + timeout

        def ok() -> ClusterStatus | None:
            st = self.cluster_status(via)
            if st.dc and st.quorate and all(w in st.online for w in want):
                return st
            return None

        st = self.wait_for(ok, timeout, what=f"cluster with {', '.join(want)} online")
        if settle:
            left = max(1, int(deadline - time.monotonic()))
            self.exec(
                via or self.first_running(),
                ["crm_resource", "--wait", f"--timeout={left}s"],
                timeout=left + 10,
            )
            st = self.cluster_status(via)
        return st

    # ------------------------------------------------------------------ up
    def up(self, *, timeout: float = 120.0) -> UpReport:
        """Build and start the lab (idempotent: a running lab is left as it is, dead nodes are booted)."""
        problems = self.preflight()
        if problems:
            raise PreflightError(problems)
        t0 = time.monotonic()
        stages: list[tuple[str, float]] = []

        def stage(name: str, since: float) -> float:
            now = time.monotonic()
            stages.append((name, now - since))
            self._log(f"{name}: {now - since:.2f} s")
            return now

        with self._locked():
            if self._state:
                if self._state.get("n") != self.n:
                    raise LabError(
                        f"lab {self.prefix} is up with {self._state.get('n')} nodes, not {self.n}: "
                        "run `down` first"
                    )
                if all(self.running(n) for n in self.nodes) and all(
                    all(self.service_status(n).values()) for n in self.nodes
                ):
                    self.wait_cluster(timeout=timeout, settle=False)
                    return UpReport(True, [], time.monotonic() - t0)
            else:
                self._claim_netns_names()
                os.makedirs(self.state_dir, exist_ok=True)
                with open(os.path.join(self.state_dir, MARKER), "w", encoding="utf-8") as f:
                    f.write(self.prefix + "\n")
                self._state = {"version": 1, "prefix": self.prefix, "n": self.n, "netns": []}
                self._state["subnet"] = str(self.network)
                self._save()
            t = time.monotonic()
            self._write_config()
            t = stage("config, keys, seed CIB", t)
            self._network()
            t = stage("network namespaces", t)
            booted = [n for n in self.nodes if not self.running(n)]
            self._boot(booted)
            t = stage(f"node namespaces ({len(booted)})", t)
            for n in self.nodes:
                self._start_service(n, "sshd")
            for n in self.nodes:
                self.wait_for(functools.partial(self._ssh_banner, n), 30, what=f"sshd on {n}")
            t = stage("sshd", t)
            for n in self.nodes:
                self._start_service(n, "corosync")
            for n in self.nodes:
                self._wait_corosync(n)
            t = stage("corosync", t)
            for n in self.nodes:
                self._start_service(n, "pacemakerd")
            self.wait_cluster(timeout=timeout, settle=False)
            stage("pacemaker (DC, all online)", t)
        return UpReport(False, stages, time.monotonic() - t0)

    def _claim_netns_names(self) -> None:
        taken = [ns for ns in [self.hub, *map(self.netns_of, self.nodes)] if netns.exists(ns)]
        if taken:
            raise LabError(
                f"netns {', '.join(taken)} exist but lab state {self.state_dir} does not: "
                f"another lab uses prefix {self.prefix!r}, or a lost lab (`python -m lab "
                f"--prefix {self.prefix} down --force`); or pick another --prefix"
            )

    def _write_config(self) -> None:
        sd = self.state_dir
        os.makedirs(self.ssh_dir, exist_ok=True)
        if not os.path.exists(self.ssh_key):
            _run(
                [
                    "ssh-keygen",
                    "-q",
                    "-t",
                    "ed25519",
                    "-N",
                    "",
                    "-C",
                    f"dtake-lab-{self.prefix}",
                    "-f",
                    self.ssh_key,
                ]
            )
        authkey = os.path.join(sd, "authkey")
        if not os.path.exists(authkey):
            with open(authkey, "wb") as f:
                f.write(os.urandom(256))
            os.chmod(authkey, 0o400)
        conf = corosync_conf(
            cluster_name=self.prefix,
            nodes=[(n, self.address(n)) for n in self.nodes],
            token_ms=self.token_ms,
            crypto=self.crypto,
        )
        _write(os.path.join(sd, "corosync.conf"), conf)
        seed = os.path.join(sd, "cib-seed.xml")
        if not os.path.exists(seed):
            props = {
                "stonith-enabled": "true" if self.fence_dummy else "false",
                "dc-deadtime": self.dc_deadtime,
            }
            seed_cib(seed, properties=props, nodes=self.nodes, fence_dummy=self.fence_dummy)
        hosts = [
            "127.0.0.1 localhost",
            "::1 localhost ip6-localhost ip6-loopback",
            f"{self.hub_address} hub",
        ]
        hosts += [f"{self.address(n)} {n}" for n in self.nodes]
        _write(os.path.join(sd, "hosts"), "\n".join(hosts) + "\n")
        known: list[str] = []
        for n in self.nodes:
            nd = self.node_dir(n)
            hostkey = os.path.join(nd, "etc.upper", "ssh", "ssh_host_ed25519_key")
            os.makedirs(os.path.dirname(hostkey), mode=0o755, exist_ok=True)
            if not os.path.exists(hostkey):
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", n, "-f", hostkey])
            pub = _read(hostkey + ".pub").split()
            known.append(f"{n},{self.address(n)} {pub[0]} {pub[1]}")
        _write(os.path.join(self.ssh_dir, "known_hosts"), "\n".join(known) + "\n")
        relay = f"{sys.executable} {os.path.join(HERE, 'relay.py')} {netns.path(self.hub)} %h %p"
        cfg = [f"# lab {self.prefix}: ssh -F {self.ssh_config} node1"]
        for n in self.nodes:
            cfg += [f"Host {n}", f"    HostName {self.address(n)}"]
        cfg += [
            f"Host {' '.join(self.nodes)}",
            "    User root",
            f"    IdentityFile {self.ssh_key}",
            "    IdentitiesOnly yes",
            f"    UserKnownHostsFile {os.path.join(self.ssh_dir, 'known_hosts')}",
            "    StrictHostKeyChecking yes",
            f"    ProxyCommand {relay}",
            "",
        ]
        _write(self.ssh_config, "\n".join(cfg))

    def _node_files(self, node: str) -> None:
        """(Re)write NODE's private dirs and its /etc overlay files; only while it is down."""
        nd = self.node_dir(node)
        for name in PRIVATE_DIRS.values():
            os.makedirs(os.path.join(nd, name), exist_ok=True)
        for name in _overlays().values():
            os.makedirs(os.path.join(nd, f"{name}.upper"), exist_ok=True)
            os.makedirs(os.path.join(nd, f"{name}.work"), exist_ok=True)
        # overlay upper dirs replace the attributes of the host dirs: keep them
        for inside, name in _overlays().items():
            st = os.stat(inside)
            os.chmod(os.path.join(nd, f"{name}.upper"), st.st_mode & 0o7777)
        # mount points below overlays must exist in the upper dir (never on the host)
        for inside in PRIVATE_DIRS:
            for ov, name in _overlays().items():
                if inside.startswith(ov + "/") and not os.path.isdir(inside):
                    os.makedirs(
                        os.path.join(nd, f"{name}.upper", inside[len(ov) + 1 :]), exist_ok=True
                    )
        os.chmod(os.path.join(nd, "tmp"), 0o1777)
        hc = _hacluster()
        pcmk = os.path.join(nd, "var-lib-pacemaker")
        for sub in ("cib", "pengine", "blackbox", "cores"):
            os.makedirs(os.path.join(pcmk, sub), exist_ok=True)
            os.chmod(os.path.join(pcmk, sub), 0o750)
            os.chown(os.path.join(pcmk, sub), *hc)
        os.chmod(pcmk, 0o750)
        os.chown(pcmk, *hc)
        logp = os.path.join(nd, "var-log-pacemaker")
        os.chmod(logp, 0o770)
        os.chown(logp, *hc)
        cib = os.path.join(pcmk, "cib", "cib.xml")
        if not os.path.exists(cib):  # a restarted node keeps its CIB, like a rebooted one
            shutil.copyfile(os.path.join(self.state_dir, "cib-seed.xml"), cib)
            os.chmod(cib, 0o600)
            os.chown(cib, *hc)
        etc = os.path.join(nd, "etc.upper")
        sd = self.state_dir
        _write(os.path.join(etc, "hostname"), node + "\n")
        shutil.copyfile(os.path.join(sd, "hosts"), os.path.join(etc, "hosts"))
        os.makedirs(os.path.join(etc, "corosync"), mode=0o755, exist_ok=True)
        shutil.copyfile(
            os.path.join(sd, "corosync.conf"), os.path.join(etc, "corosync", "corosync.conf")
        )
        _write(
            os.path.join(etc, "corosync", "authkey"),
            _read_bytes(os.path.join(sd, "authkey")),
            mode=0o400,
        )
        ssh = os.path.join(etc, "ssh")
        os.makedirs(os.path.join(ssh, "ssh_config.d"), mode=0o755, exist_ok=True)
        _write(
            os.path.join(ssh, "dtake-lab-authorized_keys"), _read(self.ssh_key + ".pub"), mode=0o644
        )
        _write(os.path.join(ssh, "dtake-lab-id_ed25519"), _read(self.ssh_key), mode=0o600)
        _write(
            os.path.join(ssh, "ssh_known_hosts"), _read(os.path.join(self.ssh_dir, "known_hosts"))
        )
        _write(
            os.path.join(ssh, "ssh_config.d", "dtake-lab.conf"),
            f"# lab {self.prefix}: nodes log in to each other as root\n"
            f"Host {' '.join(self.nodes)} {' '.join(self.address(n) for n in self.nodes)}\n"
            "    User root\n    IdentityFile /etc/ssh/dtake-lab-id_ed25519\n"
            "    StrictHostKeyChecking yes\n",
        )
        _write(
            os.path.join(ssh, "dtake-lab-sshd_config"),
            "\n".join(
                [
                    f"# lab {self.prefix}, {node}",
                    "Port 22",
                    f"ListenAddress {self.address(node)}",
                    "ListenAddress 127.0.0.1",
                    "HostKey /etc/ssh/ssh_host_ed25519_key",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "AuthorizedKeysFile /etc/ssh/dtake-lab-authorized_keys",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "UsePAM no",
                    "PidFile /run/sshd.pid",
                    "PrintMotd no",
                    "AcceptEnv LANG LC_*",
                    "Subsystem sftp internal-sftp",
                    "",
                ]
            ),
        )

    def _network(self) -> None:
        gw = f"{self.hub_address}/{self.network.prefixlen}"
        if not os.path.isdir(HOST_NETNS_DIR) and "netns_dir_created" not in self._state:
            self._state["netns_dir_created"] = True
            self._save()
        if not netns.exists(self.hub):
            self._record_netns(self.hub)
            netns.create_hub(self.hub, gw)
        for n in self.nodes:
            ns = self.netns_of(n)
            if not netns.exists(ns):
                self._record_netns(ns)
                netns.add_node(
                    self.hub, ns, self.index(n), f"{self.address(n)}/{self.network.prefixlen}"
                )

    def _record_netns(self, name: str) -> None:
        recorded: list[str] = self._state.setdefault("netns", [])
        if name not in recorded:
            recorded.append(name)
            self._save()

    def _spec(self, node: str) -> dict[str, Any]:
        nd = self.node_dir(node)
        mounts: list[dict[str, Any]] = []
        for inside, name in _overlays().items():
            up, work = os.path.join(nd, f"{name}.upper"), os.path.join(nd, f"{name}.work")
            mounts.append(
                {
                    "kind": "overlay",
                    "target": inside,
                    "options": f"lowerdir={inside},upperdir={up},workdir={work}",
                }
            )
        for inside, name in sorted(PRIVATE_DIRS.items()):
            mounts.append({"kind": "bind", "source": os.path.join(nd, name), "target": inside})
        mounts.append(
            {
                "kind": "tmpfs",
                "source": f"{self.prefix}-shm",
                "target": "/dev/shm",
                "options": "mode=1777,size=256m",
            }
        )
        mounts.append(
            {
                "kind": "tmpfs",
                "source": f"{self.prefix}-run",
                "target": "/run",
                "options": "mode=0755,size=64m",
            }
        )
        # The repo, its virtualenv and the interpreter must stay visible inside the
        # node even when they live under a directory the node gets privately (CI
        # may clone into /tmp): bind them back over the private copies.
        for shared in _shared_paths():
            covered = [p for p in (*PRIVATE_DIRS, "/run", "/dev/shm") if _under(shared, p)]
            if covered:
                mounts.append({"kind": "bind", "source": shared, "target": shared, "mkdir": True})
        return {"hostname": node, "mounts": mounts, "run_dirs": RUN_DIRS}

    def _boot(self, nodes: Sequence[str]) -> None:
        """Start the namespaces (pid-1 init) of NODES in parallel; wait until each reports."""
        pending: dict[str, tuple[int, Proc]] = {}
        try:
            for node in nodes:
                self._node_files(node)
                spec = os.path.join(self.node_dir(node), "spec.json")
                _write(spec, json.dumps(self._spec(node), indent=1))
                r, w = os.pipe()
                argv = [
                    "ip", "netns", "exec", self.netns_of(node),
                    "unshare", "--mount", "--uts", "--ipc", "--pid", "--fork", "--kill-child",
                    "--mount-proc", "--propagation", "private", "--",
                    sys.executable, os.path.join(HERE, "node_init.py"), spec,
                ]  # fmt: skip
                log = os.path.join(self.node_dir(node), "init.log")
                u = launch(argv, env=NODE_ENV, log=log, pass_fd=w)
                os.close(w)
                rec = self._node_rec(node)
                rec.update({"unshare": u.to_json(), "init": None, "spawned": {}})
                self._save()
                pending[node] = (r, u)
            deadline = time.monotonic() + 30
            for node, (r, u) in pending.items():
                msg = b""
                while not msg.endswith(b"\n"):
                    left = deadline - time.monotonic()
                    if left <= 0 or not select.select([r], [], [], left)[0]:
                        raise LabTimeout(f"{node}: init did not report within 30 s")
                    chunk = os.read(r, 512)
                    if not chunk:
                        break
                    msg += chunk
                if msg.strip() != b"ok":
                    log = os.path.join(self.node_dir(node), "init.log")
                    raise LabError(
                        f"{node}: init failed: {msg.decode().strip() or 'died'} (see {log})"
                    )
                kids = children(u.pid)
                init = Proc.of(kids[0]) if kids else None
                if init is None:
                    raise LabError(f"{node}: cannot find the init process (child of {u.pid})")
                self._node_rec(node)["init"] = init.to_json()
                self._save()
        finally:
            for r, _ in pending.values():
                os.close(r)

    def _start_service(self, node: str, service: str) -> None:
        argv, log = SERVICES[service]
        self.exec(node, ["sh", "-c", _START_SH, "sh", service, log, *argv], timeout=30)

    def service_status(self, node: str) -> dict[str, bool]:
        """Which of the lab's services (sshd, corosync, pacemakerd) run in NODE."""
        if not self.running(node):
            return dict.fromkeys(SERVICES, False)
        out = self.exec(node, ["sh", "-c", _STATUS_SH, "sh", *SERVICES], timeout=30).stdout
        return {
            line.split()[0]: line.split()[1] == "up" for line in out.splitlines() if line.strip()
        }

    def _service_pid(self, node: str, service: str) -> int | None:
        r = self.exec(node, ["cat", f"/run/dtake-lab/{service}.pid"], check=False, timeout=30)
        return int(r.stdout) if r.returncode == 0 and r.stdout.strip().isdigit() else None

    def _ssh_banner(self, node: str) -> bool:
        try:
            with self.connect(node, 22, timeout=2) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _wait_corosync(self, node: str, timeout: float = 30) -> None:
        def ok() -> bool:
            return (
                self.exec(node, ["corosync-cfgtool", "-s"], check=False, timeout=10).returncode == 0
            )

        self.wait_for(ok, timeout, interval=0.1, what=f"corosync on {node}")

    # ------------------------------------------------------------------ node life
    def kill(self, node: str, *, timeout: float = 10.0) -> None:
        """Pull NODE's plug: SIGKILL its pid-namespace init; the kernel kills everything in it."""
        with self._locked():
            self.index(node)
            self._kill_node(node, timeout)
            self._save()

    def _kill_node(self, node: str, timeout: float) -> None:
        rec = self._node_rec(node)
        init = Proc.from_json(rec["init"]) if rec.get("init") else None
        unshare = Proc.from_json(rec["unshare"]) if rec.get("unshare") else None
        spawned = [Proc.from_json(s["outer"]) for s in rec.get("spawned", {}).values()]
        if init is not None:
            init.signal(signal.SIGKILL)
        elif unshare is not None:  # init never reported: unshare --kill-child takes it along
            unshare.signal(signal.SIGKILL)
        for p in [x for x in (init, unshare) if x is not None] + spawned:
            if not p.wait_gone(timeout):
                p.signal(signal.SIGKILL)
                if not p.wait_gone(timeout):
                    raise LabError(f"{node}: process {p.pid} did not end")
        rec.update({"init": None, "unshare": None, "spawned": {}})

    def stop(self, node: str, *, timeout: float = 60.0) -> None:
        """Graceful cluster stop on NODE (pacemaker, then corosync); the node itself stays up."""
        with self._locked():
            pid = self._service_pid(node, "pacemakerd")
            if pid is not None:
                self.exec(node, ["kill", "-TERM", str(pid)], check=False)
                self.wait_for(
                    lambda: self.exec(node, ["kill", "-0", str(pid)], check=False).returncode != 0,
                    timeout,
                    what=f"pacemakerd on {node} to stop",
                )
            pid = self._service_pid(node, "corosync")
            if pid is not None:
                self.exec(node, ["corosync-cfgtool", "-H", "--force"], check=False)
                self.wait_for(
                    lambda: self.exec(node, ["kill", "-0", str(pid)], check=False).returncode != 0,
                    timeout,
                    what=f"corosync on {node} to stop",
                )

    def start(self, node: str, *, timeout: float = 60.0) -> None:
        """Power NODE on if it is off (namespaces, sshd), then start corosync and pacemaker."""
        with self._locked():
            if not self._state:
                raise LabError(f"lab {self.prefix} is not up")
            self.index(node)
            self._network()
            if not self.running(node):
                self._boot([node])
            self._start_service(node, "sshd")
            self._start_service(node, "corosync")
            self._wait_corosync(node, timeout)
            self._start_service(node, "pacemakerd")

    def netdown(self, node: str) -> None:
        """Unplug NODE's cable (its veth in the hub goes down): a network partition."""
        netns.set_cable(self.hub, self.index(node), up=False)

    def netup(self, node: str) -> None:
        netns.set_cable(self.hub, self.index(node), up=True)

    # ------------------------------------------------------------------ status / down
    def status(self) -> LabStatus:
        if not self._state:
            self._load()
        if not self._state:
            return LabStatus(self.prefix, self.state_dir, 0, [], None)
        nodes: list[NodeStatus] = []
        cluster = None
        for n in self.nodes:
            init = self._init_proc(n)
            up = init is not None and init.running()
            svc = self.service_status(n) if up else dict.fromkeys(SERVICES, False)
            nodes.append(NodeStatus(n, self.address(n), up, init.pid if up and init else None, svc))
            if cluster is None and svc.get("pacemakerd"):
                with contextlib.suppress(LabError):
                    cluster = self.cluster_status(n)
        return LabStatus(self.prefix, self.state_dir, len(nodes), nodes, cluster)

    def down(self, *, force: bool = False) -> list[str]:
        """Stop everything the lab started (by recorded PID) and delete its netns and state.

        Works from the state dir alone (also after the process that ran ``up`` died).
        With no state but netns of this prefix left over, empty ones are deleted; FORCE
        also kills the processes still inside them. Returns what was done.
        """
        done: list[str] = []
        with self._locked():
            recorded = list(self._state.get("netns", []))
            netns_dir_created = bool(self._state.get("netns_dir_created"))
            for node, rec in sorted(self._state.get("nodes", {}).items()):
                for s in rec.get("spawned", {}).values():
                    for key in ("inner", "outer"):
                        if s.get(key) and Proc.from_json(s[key]).signal(signal.SIGKILL):
                            done.append(f"killed {node} spawned pid {s[key][0]}")
                if rec.get("init") or rec.get("unshare"):
                    was = self.running(node)
                    self._kill_node(node, 10)
                    if was:
                        done.append(f"powered off {node}")
            for ns in reversed(recorded):
                if netns.exists(ns):
                    netns.delete(ns)
                    done.append(f"deleted netns {ns}")
            # lost state: netns with our exact names
            for ns in [self.hub] + [f"{self.prefix}-node{i}" for i in range(1, MAX_NODES + 1)]:
                if not netns.exists(ns):
                    continue
                pids = netns.ip("netns", "pids", ns, check=False).stdout.split()
                if pids and not force:
                    raise LabError(
                        f"netns {ns} (no lab state) still holds PIDs {' '.join(pids)}: "
                        "`down --force` kills them"
                    )
                for pid in pids:
                    p = Proc.of(int(pid))
                    if p is not None and p.signal(signal.SIGKILL):
                        p.wait_gone(10)
                        done.append(f"killed pid {pid} in netns {ns}")
                netns.delete(ns)
                done.append(f"deleted netns {ns}")
            if netns_dir_created and netns.cleanup_dir():
                done.append(f"removed {HOST_NETNS_DIR} (created by this lab, now empty)")
            if os.path.isdir(self.state_dir):
                if not os.path.exists(os.path.join(self.state_dir, MARKER)):
                    raise LabError(f"{self.state_dir} has no {MARKER} marker: not deleting it")
                self._assert_unmounted()
                shutil.rmtree(self.state_dir)
                done.append(f"deleted {self.state_dir}")
            self._state = {}
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.state_dir + ".lock")
        return done

    def _assert_unmounted(self) -> None:
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                mnt = line.split()[4]
                if mnt == self.state_dir or mnt.startswith(self.state_dir + "/"):
                    raise LabError(f"{mnt} is still mounted: not deleting {self.state_dir}")


# ---------------------------------------------------------------------- helpers
def _run(argv: Sequence[str]) -> None:
    r = subprocess.run(list(argv), capture_output=True, text=True)
    if r.returncode != 0:
        raise LabError(f"{' '.join(argv)}: {r.stderr.strip()}")


def _write(path: str, data: str | bytes, *, mode: int = 0o644) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _overlays() -> dict[str, str]:
    return {k: v for k, v in OVERLAYS.items() if os.path.isdir(k)}


def _hacluster() -> tuple[int, int]:
    import grp
    import pwd

    try:
        return pwd.getpwnam("hacluster").pw_uid, grp.getgrnam("haclient").gr_gid
    except KeyError:
        raise LabError("user hacluster / group haclient missing: install pacemaker") from None


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def _shared_paths() -> list[str]:
    """Host trees every node must see as they are: the repo, the venv, the interpreter."""
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out: list[str] = []
    for p in (repo, sys.prefix, sys.base_prefix):
        real = os.path.realpath(p)
        if os.path.isdir(real) and not any(_under(real, q) for q in out):
            out = [q for q in out if not _under(q, real)] + [real]
    return out
