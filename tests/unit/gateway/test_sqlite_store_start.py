"""Several gateways (or API processes) that start together on a fresh SQLite store all open it:
SQLite refuses the switch to WAL and the schema at once, without its busy handler, while
another process does the same."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from gateway.store.sqlite import SqliteStore
from shifter.errors import ShifterError

PROCESSES = 6
ROUNDS = 40


def _open(path: str, start: multiprocessing.synchronize.Barrier, errors: multiprocessing.Queue) -> None:
    start.wait()
    try:
        SqliteStore(path).close()
        errors.put("")
    except ShifterError as err:
        errors.put(str(err))


def test_processes_opening_a_fresh_store_together_all_succeed(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    failures = []
    for round_ in range(ROUNDS):
        path = str(tmp_path / f"round{round_}" / "gateway.db")
        start, errors = ctx.Barrier(PROCESSES), ctx.Queue()
        procs = [ctx.Process(target=_open, args=(path, start, errors)) for _ in range(PROCESSES)]
        for proc in procs:
            proc.start()
        results = [errors.get(timeout=60) for _ in procs]
        for proc in procs:
            proc.join(60)
            assert proc.exitcode == 0
        failures += [r for r in results if r]
    assert failures == []
