"""A process pool for benchmark runs that a signal stops cleanly (``--jobs N``).

Standard library only, so that it imports nothing heavy. Why it hands out one call at a time:
docs/benchmarks.md, "The suites of `benchmarks.run`".
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from typing import Any


class PoolStopped(RuntimeError):
    """SIGTERM or SIGINT stopped :func:`run_pool`; the calls that finished were delivered."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        #: The exit status for the command: the shell's 128 + signal number.
        self.exit_code = exit_code


def run_pool(calls: list[Callable[[], Any]], jobs: int,
             on_result: Callable[[int, Any], None] | None = None) -> list[Any]:
    """Run each call in one of ``jobs`` spawned processes; stop cleanly on SIGTERM or SIGINT.

    At most ``jobs`` calls are handed to the pool at once. A signal starts no new call, passes
    SIGTERM on to the workers (whose run guards checkpoint, so a later call resumes), waits for
    them and raises :class:`PoolStopped`. A failed call also starts no new one: the running
    calls finish (their results are kept) and the first error is raised.

    Args:
        calls: Picklable calls without arguments (e.g. ``functools.partial`` of a module-level
            function), run in processes started with "spawn".
        jobs: Calls running at once.
        on_result: Called in this process as ``on_result(index, result)`` as each call ends.

    Returns:
        The results in the order of ``calls``.

    Raises:
        PoolStopped: A signal stopped the pool (finished calls have gone to ``on_result``).
    """
    results: dict[int, Any] = {}
    got: list[str] = []
    old = {s: signal.signal(s, lambda signum, frame: got.append(signal.Signals(signum).name))
           for s in (signal.SIGTERM, signal.SIGINT)}
    error: BaseException | None = None
    try:
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            todo = list(enumerate(calls))[::-1]
            running: dict[Future, int] = {}
            forwarded = False
            while todo or running:
                while todo and len(running) < jobs and not got and error is None:
                    i, call = todo.pop()
                    running[pool.submit(call)] = i
                if not running:
                    break
                done, _ = wait(running, timeout=0.5, return_when=FIRST_COMPLETED)
                if got and not forwarded:
                    # ``kill PID`` of this process only: the workers have not had the signal.
                    for child in multiprocessing.active_children():
                        if child.pid is not None:
                            os.kill(child.pid, signal.SIGTERM)
                    forwarded = True
                for fut in done:
                    i = running.pop(fut)
                    try:
                        results[i] = fut.result()
                    except BaseException as exc:  # noqa: BLE001 - re-raised below
                        if not got and error is None:
                            error = exc
                        continue
                    if on_result is not None:
                        on_result(i, results[i])
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
    if got:
        raise PoolStopped(f"stopped by {got[0]}: {len(results)} of {len(calls)} calls "
                          "finished, the rest were not started or did not finish",
                          143 if got[0] == "SIGTERM" else 130)
    if error is not None:
        raise error
    return [results[i] for i in range(len(calls))]
