"""Shared fixtures: quiet, offline, small."""

import os
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


@pytest.fixture(autouse=True)
def _run_in_tmp(tmp_path, monkeypatch):
    """Every test runs in its own folder so runs/ and lightning_logs/ never leak."""
    monkeypatch.chdir(tmp_path)
