"""The small library the dtake OCF agents share (stdlib only, imports kept lazy).

What it gives an agent: the OCF 1.1 exit codes (with the promoted/degraded ones that
``ocf.py`` lacks, anchors-cluster.md §1.2), the action environment as one object,
``ocf-exit-reason:`` lines, a one-call client for the dtake control socket, a seam for
the pacemaker tools (``crm_attribute``, ``cibadmin``, ``crm_node``) that unit tests script,
DTD-clean meta-data (stock ``ocf-tester`` validates against ra-api-1.dtd), and dispatch
where an exception becomes rc 1 with an exit reason - never rc 6 from stop.

Monitor cost is the point (DESIGN §6): json + socket are the only imports on the monitor
path; ``subprocess`` is imported only when a pacemaker tool must really run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Callable, Mapping, Sequence

# typing costs ~10 ms to import: annotations are strings here (PEP 563), and the
# names below exist for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol
else:
    Protocol = object

__all__ = [
    "DEFAULT_PORT",
    "OCF_DEGRADED",
    "OCF_DEGRADED_PROMOTED",
    "OCF_ERR_ARGS",
    "OCF_ERR_CONFIGURED",
    "OCF_ERR_GENERIC",
    "OCF_ERR_INSTALLED",
    "OCF_ERR_PERM",
    "OCF_ERR_UNIMPLEMENTED",
    "OCF_FAILED_PROMOTED",
    "OCF_NOT_RUNNING",
    "OCF_RUNNING_PROMOTED",
    "OCF_SUCCESS",
    "Action",
    "Agent",
    "AgentError",
    "ControlClient",
    "Env",
    "Handler",
    "Param",
    "Runner",
    "ServiceError",
    "SubprocessRunner",
    "dispatch",
    "exit_reason",
    "meta_data",
]

OCF_SUCCESS = 0
OCF_ERR_GENERIC = 1
OCF_ERR_ARGS = 2
OCF_ERR_UNIMPLEMENTED = 3
OCF_ERR_PERM = 4
OCF_ERR_INSTALLED = 5
OCF_ERR_CONFIGURED = 6
OCF_NOT_RUNNING = 7
OCF_RUNNING_PROMOTED = 8
OCF_FAILED_PROMOTED = 9
OCF_DEGRADED = 190  # OCF 1.1; pacemaker >= 2.0.5 treats it as 0, shown degraded
OCF_DEGRADED_PROMOTED = 191

DEFAULT_SOCKET = "/run/dtake/dtake.sock"
# dtake.config.DEFAULT_PORT: the agents cannot import dtake (copied standalone, run with
# -S, stdlib only); tests/unit/test_config.py keeps the two equal.
DEFAULT_PORT = 6320
STATE_DIR = "/run/resource-agents"  # tmpfs: cleared on reboot, like -l reboot attributes


class AgentError(Exception):
    """An action failed: ``rc`` plus the exit reason the operator reads."""

    def __init__(self, rc: int, reason: str) -> None:
        super().__init__(reason)
        self.rc = rc
        self.reason = reason


class ServiceError(Exception):
    """The dtake service refused (``code`` is the seed's error code) or is unreachable."""

    def __init__(self, code: int, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.unreachable = unreachable


def exit_reason(msg: str) -> None:
    """One ``ocf-exit-reason:`` line on stderr (crm_mon shows it as exitreason=)."""
    prefix = os.environ.get("OCF_EXIT_REASON_PREFIX", "ocf-exit-reason:")
    sys.stderr.write(f"{prefix}{msg}\n")
    sys.stderr.flush()
    log("err", msg)


def log(level: str, msg: str) -> None:
    """To syslog (as ocf_log does), and to HA_LOGFILE when set; never raises."""
    tag = f"{os.environ.get('OCF_RESOURCE_TYPE', 'dtake')}({os.environ.get('OCF_RESOURCE_INSTANCE', '?')})"
    try:
        import syslog

        prio = {"err": syslog.LOG_ERR, "warning": syslog.LOG_WARNING}.get(level, syslog.LOG_INFO)
        syslog.openlog(tag, 0, syslog.LOG_DAEMON)
        syslog.syslog(prio, f"{level.upper()}: {msg}")
    except Exception:
        pass
    path = os.environ.get("HA_LOGFILE")
    if path:
        try:
            with open(path, "a", encoding="utf-8") as fh:
                fh.write(f"{tag} {level.upper()}: {msg}\n")
        except OSError:
            pass


# ---------------------------------------------------------------------------- environment
class Env:
    """What pacemaker hands an action (anchors-cluster.md §1.3)."""

    __slots__ = ("action", "instance", "meta", "node", "params")

    def __init__(
        self,
        action: str,
        params: Mapping[str, str],
        meta: Mapping[str, str],
        instance: str,
        node: str,
    ) -> None:
        self.action = action
        self.params = params
        self.meta = meta
        self.instance = instance  # OCF_RESOURCE_INSTANCE without the ":N" clone suffix
        self.node = node

    @classmethod
    def from_environ(cls, argv: Sequence[str], environ: Mapping[str, str]) -> Env:
        action = argv[1] if len(argv) > 1 else environ.get("__OCF_ACTION", "")
        params: dict[str, str] = {}
        meta: dict[str, str] = {}
        for k, v in environ.items():
            if k.startswith("OCF_RESKEY_CRM_meta_"):
                meta[k[len("OCF_RESKEY_CRM_meta_") :]] = v
            elif k.startswith("OCF_RESKEY_"):
                params[k[len("OCF_RESKEY_") :]] = v
        inst = environ.get("OCF_RESOURCE_INSTANCE", "") or "default"
        node = meta.get("on_node") or environ.get("HA_NODENAME") or os.uname().nodename
        return cls(action, params, meta, inst.split(":")[0], node)

    def param(self, name: str, default: str = "") -> str:
        return self.params.get(name, default)

    @property
    def interval_ms(self) -> int:
        try:
            return int(self.meta.get("interval", "0") or 0)
        except ValueError:
            return 0

    @property
    def is_probe(self) -> bool:
        return self.action == "monitor" and self.interval_ms == 0

    def timeout_s(self, default: float) -> float:
        """The op timeout (ms in the env): bounds every internal wait, as drbd.ocf does."""
        try:
            v = int(self.meta.get("timeout", "") or 0)
        except ValueError:
            v = 0
        return v / 1000.0 if v > 0 else default


# ---------------------------------------------------------------------------- control socket
class ControlClient:
    """One JSON line per request on the dtake control socket (see dtake/client.py)."""

    def __init__(self, path: str | None = None, *, timeout: float = 20.0) -> None:
        self.path = path or os.environ.get("DTAKE_SOCKET") or DEFAULT_SOCKET
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.path)
            except OSError as exc:
                s.close()
                raise ServiceError(
                    -110,
                    f"dtake service not reachable at {self.path}: {exc.strerror or exc}",
                    unreachable=True,
                ) from exc
            self._sock = s
        sock = self._sock
        sock.settimeout(timeout if timeout is not None else self.timeout)
        try:
            sock.sendall(json.dumps({"cmd": cmd, "args": args}).encode() + b"\n")
            while b"\n" not in self._buf:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    raise OSError("connection closed by the service")
                self._buf += chunk
        except OSError as exc:
            self.close()
            raise ServiceError(-110, f"dtake service: {exc}", unreachable=True) from exc
        line, self._buf = self._buf.split(b"\n", 1)
        resp = json.loads(line)
        if not resp.get("ok"):
            err = resp.get("error") or {}
            raise ServiceError(int(err.get("code", -1)), str(err.get("message", "error")))
        return resp.get("result")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


# ---------------------------------------------------------------------------- pacemaker tools
class Runner(Protocol):
    """The seam in front of the pacemaker tools: argv -> (rc, stdout)."""

    def __call__(self, argv: Sequence[str], *, timeout: float = 30.0) -> tuple[int, str]: ...


class SubprocessRunner:
    def __call__(self, argv: Sequence[str], *, timeout: float = 30.0) -> tuple[int, str]:
        import subprocess

        try:
            r = subprocess.run(
                list(argv), capture_output=True, text=True, timeout=timeout, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return 127, str(exc)
        if r.returncode != 0 and r.stderr:
            log("info", f"{' '.join(argv)}: rc {r.returncode}: {r.stderr.strip()}")
        return r.returncode, r.stdout


class StateCache:
    """What this node last published (score, attributes), so monitor forks a pacemaker
    tool only when a value changes (drbd.ocf's per-invocation cache, kept across calls)."""

    def __init__(self, name: str, directory: str | None = None) -> None:
        d = directory or os.environ.get("HA_RSCTMP") or STATE_DIR
        self.path = os.path.join(d, f"dtake-{name}.json")
        try:
            with open(self.path, encoding="utf-8") as fh:
                self.data: dict[str, Any] = json.load(fh)
        except (OSError, ValueError):
            self.data = {}
        self._dirty = False

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        if self.data.get(key) != value:
            self.data[key] = value
            self._dirty = True

    def drop(self, key: str) -> None:
        if key in self.data:
            del self.data[key]
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(self.data, fh)
            os.replace(tmp, self.path)
        except OSError:
            pass  # a lost cache only costs one extra crm_attribute call
        self._dirty = False

    def clear(self) -> None:
        self.data = {}
        try:
            os.unlink(self.path)
        except OSError:
            pass


# ---------------------------------------------------------------------------- meta-data
class Param:
    __slots__ = ("default", "longdesc", "name", "required", "shortdesc", "type", "unique")

    def __init__(
        self,
        name: str,
        shortdesc: str,
        longdesc: str,
        type: str = "string",  # string | integer | boolean (the DTD knows no "select")
        default: str | None = None,
        required: bool = False,
        unique: bool = False,
    ) -> None:
        self.name, self.shortdesc, self.longdesc = name, shortdesc, longdesc
        self.type, self.default, self.required, self.unique = type, default, required, unique


class Action:
    __slots__ = ("depth", "interval", "name", "role", "timeout")

    def __init__(
        self,
        name: str,
        timeout: str,
        interval: str | None = None,
        depth: str | None = None,
        role: str | None = None,
    ) -> None:
        self.name, self.timeout, self.interval, self.depth, self.role = (
            name,
            timeout,
            interval,
            depth,
            role,
        )


def _esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")


def meta_data(
    name: str,
    shortdesc: str,
    longdesc: str,
    params: Sequence[Param],
    actions: Sequence[Action],
    *,
    version: str = "1.0",
) -> str:
    """OCF 1.1 meta-data that stock ocf-tester accepts (ra-api-1.dtd): DOCTYPE present, no
    reloadable/unique-group/select, no custom actions (anchors-cluster.md §1.6)."""
    out = [
        '<?xml version="1.0"?>',
        '<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">',
        f'<resource-agent name="{name}" version="{version}">',
        "<version>1.1</version>",
        f'<longdesc lang="en">{_esc(longdesc)}</longdesc>',
        f'<shortdesc lang="en">{_esc(shortdesc)}</shortdesc>',
        "<parameters>",
    ]
    for p in params:
        out.append(
            f'<parameter name="{p.name}" unique="{int(p.unique)}" required="{int(p.required)}">'
        )
        out.append(f'<longdesc lang="en">{_esc(p.longdesc)}</longdesc>')
        out.append(f'<shortdesc lang="en">{_esc(p.shortdesc)}</shortdesc>')
        default = f' default="{_esc(p.default)}"' if p.default is not None else ""
        out.append(f'<content type="{p.type}"{default}/>')
        out.append("</parameter>")
    out += ["</parameters>", "<actions>"]
    for a in actions:
        attrs = [f'name="{a.name}"', f'timeout="{a.timeout}"']
        if a.interval:
            attrs.append(f'interval="{a.interval}"')
        if a.depth:
            attrs.append(f'depth="{a.depth}"')
        if a.role:
            attrs.append(f'role="{a.role}"')
        out.append(f"<action {' '.join(attrs)}/>")
    out += ["</actions>", "</resource-agent>", ""]
    return "\n".join(out)


# ---------------------------------------------------------------------------- dispatch
Handler = Callable[[], int]


class Agent:
    """What both agents share: the control-socket client bounded by the op timeout, the
    parameter checks of validate-all, meta-data, and ``main`` (environment -> dispatch).

    A subclass sets the class attributes and defines ``validate``, ``start``, ``stop``
    and ``monitor`` (and adds its own handlers through ``handlers``)."""

    NAME = ""
    SHORTDESC = ""
    LONGDESC = ""
    PARAMS: Sequence[Param] = ()
    ACTIONS: Sequence[Action] = ()
    USAGE = ""
    CHOICES: Mapping[str, Sequence[str]] = {}  # parameter -> allowed values
    NUMBERS: Sequence[str] = ()  # parameters that must be non-negative integers

    MARGIN_S = 2.0  # kept back from the op timeout to return (and log) before pacemaker kills us

    def __init__(self, env: Env, *, client: ControlClient | None = None) -> None:
        import time

        self.env = env
        self.client = client or ControlClient(env.param("socket") or None)
        self._clock = time.monotonic
        default = self.default_timeout_s(env.action)
        self.deadline = self._clock() + max(1.0, env.timeout_s(default) - self.MARGIN_S)

    @classmethod
    def default_timeout_s(cls, action: str) -> float:
        """The meta-data's timeout of ACTION: what applies when the caller gives none
        (ocf-tester, a manual run); 30 s for an action the meta-data does not list."""
        for a in cls.ACTIONS:
            if a.name == action:
                t = a.timeout.strip()
                scale = {"s": 1, "m": 60, "h": 3600}.get(t[-1:], 1)
                try:
                    return float(t.rstrip("smh")) * scale
                except ValueError:
                    break
        return 30.0

    def remaining(self) -> float:
        """Seconds left of this action's op timeout (less the margin)."""
        return max(0.0, self.deadline - self._clock())

    def _call(self, cmd: str, timeout: float | None = None, **args: Any) -> Any:
        """One request; its socket timeout never runs past the action's deadline, so the
        calls of one action together stay within the op timeout."""
        left = max(0.5, self.remaining())
        return self.client.call(cmd, timeout=min(timeout or left, left), **args)

    def check_params(self) -> None:
        """CHOICES and NUMBERS: wrong on every node alike, so OCF_ERR_CONFIGURED."""
        for name, allowed in self.CHOICES.items():
            v = self.env.param(name)
            if v and v not in allowed:
                raise AgentError(
                    OCF_ERR_CONFIGURED, f"{name} must be one of {', '.join(allowed)}, not {v!r}"
                )
        for name in self.NUMBERS:
            v = self.env.param(name)
            if v and not v.isdigit():
                raise AgentError(OCF_ERR_CONFIGURED, f"{name} must be a number, not {v!r}")

    def validate(self) -> int:
        self.check_params()
        return OCF_SUCCESS

    def start(self) -> int:
        raise NotImplementedError

    def stop(self) -> int:
        raise NotImplementedError

    def monitor(self) -> int:
        raise NotImplementedError

    def meta_data(self) -> int:
        print(meta_data(self.NAME, self.SHORTDESC, self.LONGDESC, self.PARAMS, self.ACTIONS))
        return OCF_SUCCESS

    def handlers(self) -> dict[str, Handler]:
        return {
            "meta-data": self.meta_data,
            "start": self.start,
            "stop": self.stop,
            "monitor": self.monitor,
            "validate-all": self.validate,
        }

    @classmethod
    def main(cls, argv: Sequence[str] | None = None) -> int:
        env = Env.from_environ(list(argv if argv is not None else sys.argv), os.environ)
        return dispatch(env, cls(env).handlers(), cls.USAGE)


def dispatch(env: Env, handlers: Mapping[str, Handler], usage: str) -> int:
    """Run the handler of ``env.action``; exceptions become rc 1 + exit reason.

    stop never turns a failure into 6 (that would stop the resource cluster-wide, and a
    failed stop is fenced): drbd.ocf's rule (anchors-cluster.md §2.4)."""
    if env.action in ("usage", "help", "-h", "--help"):
        print(usage)
        return OCF_SUCCESS
    fn = handlers.get(env.action)
    if fn is None:
        print(usage, file=sys.stderr)
        return OCF_ERR_UNIMPLEMENTED
    try:
        return fn()
    except AgentError as exc:
        exit_reason(exc.reason)
        if env.action == "stop" and exc.rc == OCF_ERR_CONFIGURED:
            return OCF_ERR_GENERIC
        if env.is_probe and exc.rc not in (OCF_NOT_RUNNING, OCF_ERR_INSTALLED):
            return OCF_NOT_RUNNING  # a probe reports; it never fails [STYLE.md]
        return exc.rc
    except ServiceError as exc:
        exit_reason(exc.message)
        if env.is_probe:
            return OCF_NOT_RUNNING
        return OCF_ERR_GENERIC
    except Exception as exc:  # a bug must still leave a reason, not only a traceback
        exit_reason(f"{env.action} failed: {type(exc).__name__}: {exc}")
        return OCF_NOT_RUNNING if env.is_probe else OCF_ERR_GENERIC
