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
    cnf = CNF(net, solver=SolverConfig(adjoint=False, atol=1e-5, rtol=1e-5))
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
    assert choose_backprop(100, 11, free_bytes=8000, share=0.25, headroom=2.0) == "adjoint"
    assert choose_backprop(100, 10, free_bytes=0, share=1.0) == "adjoint"
    with pytest.raises(ValueError, match="share must be in"):
        choose_backprop(1, 1, 1, share=0.0)
    with pytest.raises(ValueError, match="headroom must be"):
        choose_backprop(1, 1, 1, share=0.5, headroom=0.5)


def test_default_share_is_more_conservative_on_cpu():
    assert memory.default_memory_share("cpu") == memory.CPU_MEMORY_SHARE == 0.25
    assert memory.default_memory_share("cuda") == memory.CUDA_MEMORY_SHARE == 0.5


def test_available_memory_reads_meminfo_and_respects_a_cgroup_limit(monkeypatch):
    free = available_memory("cpu")
    assert free > 0
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 12345.0)
    assert available_memory("cpu") == 12345
