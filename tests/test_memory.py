"""The memory estimate behind backprop="auto": measured bytes, the decision rule, free memory."""

import pytest
import torch

from polyreg_cnf import CNF, ODENet, SolverConfig
from polyreg_cnf.engine import memory
from polyreg_cnf.engine.memory import available_memory, choose_backprop, saved_tensor_bytes


def test_saved_bytes_match_the_closed_form_of_a_two_layer_net():
    torch.manual_seed(0)
    w1 = torch.randn(3, 8, requires_grad=True)
    w2 = torch.randn(8, 2, requires_grad=True)
    x = torch.randn(5, 3)
    _, n = saved_tensor_bytes(lambda v: torch.tanh(v @ w1) @ w2, x)
    # matmul 1 saves x (5x3); tanh saves its output (5x8), which matmul 2 saves too (one storage)
    assert n == (5 * 3 + 5 * 8) * 4


def test_parameters_and_shared_storages_are_not_counted():
    w = torch.randn(4, 4, requires_grad=True)
    _, n = saved_tensor_bytes(lambda: (w * w).sum())
    assert n == 0
    x = torch.randn(10, 4, requires_grad=True)
    _, n = saved_tensor_bytes(lambda: (x.exp() * 2).sum())
    # x is a leaf requiring grad: only exp's output (10x4 float32) counts
    assert n == 10 * 4 * 4


@pytest.mark.parametrize("dim,batch", [(2, 256), (8, 64)])
def test_bytes_per_evaluation_times_nfe_predicts_a_direct_solve(dim, batch):
    # The estimate behind backprop="auto": what one evaluation of a CNF field keeps for backward,
    # times the forward NFE, must equal what a whole direct-backprop solve keeps (within 5 %).
    torch.manual_seed(0)
    net = ODENet(dim, (32, 32), layer_type="concatsquash", nonlinearity="tanh")
    cnf = CNF(net, solver=SolverConfig(backprop="direct", atol=1e-5, rtol=1e-5))
    x = torch.randn(batch, dim)
    _, whole = saved_tensor_bytes(cnf, x)
    nfe = cnf.nfe.forward
    z = x.clone().requires_grad_(True)

    def one_evaluation(z):
        dz = net(torch.tensor(0.5), z)
        eps = torch.randn_like(z)
        (vjp,) = torch.autograd.grad(dz, z, eps, create_graph=True)
        return dz, (vjp * eps).sum(1)

    _, per_eval = saved_tensor_bytes(one_evaluation, z)
    assert nfe >= 8
    assert whole == pytest.approx(per_eval * nfe, rel=0.05)


def test_choice_rule_is_the_documented_inequality():
    # NFE x bytes x headroom <= share x free  ->  direct
    assert choose_backprop(100, 10, free_bytes=8000, share=0.25, headroom=2.0) == "direct"
    assert choose_backprop(100, 11, free_bytes=8000, share=0.25, headroom=2.0) == "memory_bounded"
    assert choose_backprop(100, 10, free_bytes=0, share=1.0) == "memory_bounded"
    with pytest.raises(ValueError, match="share must be in"):
        choose_backprop(1, 1, 1, share=0.0)
    with pytest.raises(ValueError, match="headroom must be"):
        choose_backprop(1, 1, 1, share=0.5, headroom=0.5)


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("files,expected", [
    # cgroup v2: limit and usage in bytes
    ({"v2": ("4000000000\n", "1500000000\n")}, 2_500_000_000),
    # v2 unlimited ("max"): v1 is consulted next
    ({"v2": ("max\n", "100\n"), "v1": ("3000000000\n", "1000000000\n")}, 2_000_000_000),
    # v1's "unlimited" is a number near 2**63
    ({"v1": (f"{2**63 - 4096}\n", "100\n")}, None),
    # usage above the limit: nothing left, never negative
    ({"v2": ("1000\n", "5000\n")}, 0),
    # corrupt usage: skipped, like a missing file
    ({"v2": ("1000000\n", "lots\n")}, None),
    ({}, None),
])
def test_cgroup_limit_is_read_from_the_controller_files(tmp_path, monkeypatch, files, expected):
    # meminfo says 3 GB available; the cgroup (when it has a limit) says how much is left
    monkeypatch.setattr(memory, "MEMINFO", _write(tmp_path, "meminfo",
                                                  "MemTotal: 8000000 kB\n"
                                                  "MemAvailable: 3000000 kB\n"))
    pairs = []
    for version in ("v2", "v1"):
        if version in files:
            limit, usage = files[version]
            pairs.append((_write(tmp_path, f"{version}.limit", limit),
                          _write(tmp_path, f"{version}.usage", usage)))
        else:
            pairs.append((str(tmp_path / f"{version}.missing"), str(tmp_path / "nope")))
    monkeypatch.setattr(memory, "CGROUP_FILES", tuple(pairs))
    meminfo = 3_000_000 * 1024
    assert available_memory("cpu") == (meminfo if expected is None else expected)


def test_meminfo_without_the_line_or_file_counts_as_no_free_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "CGROUP_FILES", ())
    monkeypatch.setattr(memory, "MEMINFO", _write(tmp_path, "meminfo", "MemTotal: 1 kB\n"))
    assert available_memory("cpu") == 0  # the safe side: choose_backprop then picks memory-bounded
    assert choose_backprop(1, 1, available_memory("cpu"), share=1.0) == "memory_bounded"
