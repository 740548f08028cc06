"""Shared fixtures: quiet, offline, small."""

import functools
import http.server
import os
import threading
import warnings

import pytest
import torch

# Tiny models on a 2-core machine: one intra-op thread per process is faster, and it avoids the
# pathological slow-down of OpenMP threads competing with other processes (DDP tests run two).
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
warnings.filterwarnings("ignore", message=".*does not have many workers.*")
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny ops run faster so, and two threads on a loaded 2-core
    machine thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def euler_run_summary():
    """Check a run summary's solver lines for a run trained on one Euler step (evaluated by the
    default dopri5) and return its printed ``val/solver_gap``."""
    def check(out: str) -> float:
        assert "training solver:            euler, step_size=1" in out
        assert "evaluation solver:          dopri5, atol=1e-05, rtol=1e-05" in out
        return float(out.split("solver gap (val, nats):")[1].split()[0])
    return check


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder so runs/ and lightning_logs/ never leak."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _no_observer_left_active():
    """No test may leave an observer (recorder, counter) active: it would watch later solves."""
    from polyreg_cnf.engine import observers as observe

    yield
    left = observe._ACTIVE.get()
    observe._ACTIVE.set(())
    assert left == (), f"observers left active after the test: {left}"


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):  # keep the test output clean
        pass


@pytest.fixture
def loopback_server(tmp_path):
    """Serve tmp_path/served on 127.0.0.1 (a free port) for one test: yields (folder, base URL).

    Stands in for a download site: no test ever reaches beyond the loopback interface.
    """
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(served))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield served, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
