"""Benchmarks: side-by-side measurements against the peers (never timed tests).

``python -m bench`` (``make bench``) runs every ``bench/bench_*.py`` module that has a
``main()``; each prints a table and writes ``bench/results/<name>.json``.
"""
