"""benchmarks' process pool (pool.run_pool): a stop starts nothing new and leaves no worker.

Each test runs a small script as its own process, the way `benchmarks/run.py --jobs 2` and
`benchmarks/frontier.py --jobs 2` run, and signals it as a user or a scheduler would: `kill PID`
of the main process, or `kill -- -PGID` of its whole process group. The calls stand in for
training runs: they note when they start and, like a run's guard, stop at a SIGTERM.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

SCRIPT = textwrap.dedent("""
    import functools, os, signal, sys, time
    from pathlib import Path

    def call(i, folder, mode):
        folder = Path(folder)
        (folder / f"started-{i}").write_text(str(os.getpid()))
        if mode == "fail" and i == 0:
            raise ValueError("call 0 is bad")
        stop = []
        signal.signal(signal.SIGTERM, lambda *a: stop.append(1))  # as a run's guard does
        end = time.monotonic() + (2 if mode == "fail" else 30)
        while not stop and time.monotonic() < end:
            time.sleep(0.05)
        (folder / f"{'stopped' if stop else 'finished'}-{i}").write_text("")
        if stop:
            raise RuntimeError(f"call {i} stopped")  # as harness.RunInterrupted
        return i

    if __name__ == "__main__":
        bench, folder, mode = sys.argv[1:]
        sys.path.insert(0, bench)
        from pool import PoolStopped, run_pool
        seen = []
        try:
            run_pool([functools.partial(call, i, folder, mode) for i in range(4)], 2,
                     lambda i, r: seen.append(r))
        except PoolStopped as exc:
            print(exc, file=sys.stderr)
            sys.exit(exc.exit_code)
        print("results", seen)
""")


def _alive(pid: int) -> bool:
    # Signal 0 checks only that the process exists. A worker the pool shut down properly was
    # reaped by the main process, so it no longer exists; a stray worker still runs.
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _group_gone(pgid: int, seconds: float = 20.0) -> bool:
    """Whether every process of the script's session (its process group) is gone, polled up to
    ``seconds``. Once the group is empty no process is left that could start a call, so what
    the calls wrote is final: no sleep has to guess how long a stray worker takes."""
    end = time.monotonic() + seconds
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() > end:
            return False
        time.sleep(0.05)


def _start(tmp_path: Path, mode: str) -> subprocess.Popen:
    script = tmp_path / "pool_script.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    return subprocess.Popen([sys.executable, str(script), str(BENCH), str(out), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _wait_for(paths: list[Path], proc: subprocess.Popen, seconds: float = 120) -> None:
    end = time.monotonic() + seconds
    while not all(p.exists() for p in paths):
        if proc.poll() is not None:
            raise AssertionError(f"the script ended early: {proc.communicate()}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{paths} did not appear in {seconds} s")
        time.sleep(0.1)


@pytest.mark.parametrize("target", ["main process", "process group"])
def test_a_signal_stops_the_running_calls_and_starts_none(tmp_path: Path, target: str) -> None:
    # A pool given every call at once (as benchmarks/*.py had) dies with the main process and
    # its workers go on to the queued calls: call 2 started with nobody left to collect it.
    proc = _start(tmp_path, "stop")
    out = tmp_path / "out"
    _wait_for([out / "started-0", out / "started-1"], proc)
    workers = {int((out / f"started-{i}").read_text()) for i in (0, 1)}
    if target == "main process":
        os.kill(proc.pid, signal.SIGTERM)  # the workers must hear of it from the main process
    else:
        os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "stopped by SIGTERM: 0 of 4 calls finished" in err
    assert (out / "stopped-0").exists() and (out / "stopped-1").exists()
    # A stray worker (one the pool did not shut down) keeps the group alive: it either waits
    # for work or runs a queued call, which lasts 30 s, longer than the 20 s allowed here.
    assert _group_gone(proc.pid), "a worker outlived the pool"
    assert not any(_alive(pid) for pid in workers)
    assert sorted(p.name for p in out.glob("started-*")) == ["started-0", "started-1"]


def test_a_failed_call_starts_none_and_lets_the_running_one_finish(tmp_path: Path) -> None:
    proc = _start(tmp_path, "fail")
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 1
    assert "ValueError: call 0 is bad" in err
    done = tmp_path / "out"
    assert (done / "finished-1").exists()  # the running call was not cut short
    assert sorted(p.name for p in done.glob("started-*")) == ["started-0", "started-1"]


def test_every_call_runs_and_the_results_keep_their_order(tmp_path: Path) -> None:
    script = tmp_path / "ok.py"
    script.write_text(textwrap.dedent("""
        import functools, sys
        def square(i):
            return i * i
        if __name__ == "__main__":
            sys.path.insert(0, sys.argv[1])
            from pool import run_pool
            seen = []
            print(run_pool([functools.partial(square, i) for i in range(5)], 2,
                           lambda i, r: seen.append(i)), sorted(seen))
    """))
    done = subprocess.run([sys.executable, str(script), str(BENCH)], capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[0, 1, 4, 9, 16] [0, 1, 2, 3, 4]"
