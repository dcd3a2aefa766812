"""Run every ``bench/bench_*.py`` module that has a ``main()``.

    python -m bench                      # all of them, default options
    python -m bench replication capture  # only these (name without ``bench_``)
    python -m bench --list

Modules run one after another in their own process-level state (imported here, called
with their default options); a failing benchmark is reported and the others still run.
The exit status is non-zero if any benchmark failed or returned non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
import time
import traceback

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def discover() -> list[str]:
    """Module names (``bench_x``) of bench/bench_*.py, sorted."""
    return sorted(
        f[:-3] for f in os.listdir(BENCH_DIR) if f.startswith("bench_") and f.endswith(".py")
    )


def run_one(name: str) -> int:
    mod = importlib.import_module(f"bench.{name}")
    fn = getattr(mod, "main", None)
    if not callable(fn):
        print(f"== {name}: no main(), skipped")
        return 0
    print(f"== {name}", flush=True)
    t = time.monotonic()
    params = inspect.signature(fn).parameters
    saved = sys.argv
    try:
        if params:
            rc = fn([])  # main(argv=None) style: default options
        else:
            sys.argv = [f"bench.{name}"]  # main() parses sys.argv itself
            rc = fn()
    finally:
        sys.argv = saved
    print(f"== {name}: exit {rc or 0} after {time.monotonic() - t:.1f}s\n", flush=True)
    return int(rc or 0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("names", nargs="*", help="benchmarks to run (e.g. replication); default all")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    a = p.parse_args(argv)
    mods = discover()
    if a.list:
        print("\n".join(m.removeprefix("bench_") for m in mods))
        return 0
    if a.names:
        wanted = {n if n.startswith("bench_") else f"bench_{n}" for n in a.names}
        unknown = wanted - set(mods)
        if unknown:
            p.error(f"unknown benchmark(s): {', '.join(sorted(unknown))}")
        mods = [m for m in mods if m in wanted]
    failed: list[str] = []
    for m in mods:
        try:
            if run_one(m) != 0:
                failed.append(m)
        except SystemExit as exc:  # a benchmark that cannot run here says so and exits
            print(f"== {m}: exited: {exc}\n", flush=True)
            if exc.code not in (0, None):
                failed.append(m)
        except Exception:
            traceback.print_exc()
            failed.append(m)
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
