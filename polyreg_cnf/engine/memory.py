r"""Choosing between direct backprop and the adjoint from a memory estimate.

Backpropagating through the solver ("direct") keeps every evaluation's activations until the
backward pass: memory grows with the forward NFE,

.. math:: M_\text{direct} \approx \text{NFE}_\text{forward} \times M_\text{eval},

but the backward pass is one reverse sweep with no extra function evaluations. The adjoint needs
O(1) memory in NFE but solves a second ODE backwards (typically as many evaluations again, more
with the penalty's interior output times). On the models this project trains, direct backprop
was 1.5-2x faster per step whenever it fits (``benchmarks/results/full.md``, arms 5 and 3b), so
the rule is: direct when the estimate fits a share of the free memory, else memory-bounded
backprop (``"memory_bounded"`` here; the block then uses the step checkpoints of
:mod:`polyreg_cnf.engine.step_checkpoint` for solves with interior output times when one step's
graph fits the same budget, and the adjoint otherwise).

:math:`M_\text{eval}` is measured, not guessed: one evaluation of the vector field runs under
:func:`torch.autograd.graph.saved_tensors_hooks`, which sees every tensor autograd keeps for
the backward pass (the trace's double-backward graph included).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

__all__ = ["available_memory", "choose_backprop", "default_memory_share",
           "saved_tensor_bytes"]

#: Direct backprop is chosen when NFE x bytes per evaluation x headroom fits this share of the
#: free memory. On CPU an overrun is not an exception but the kernel's OOM killer, so the CPU
#: share is the more conservative one; on CUDA an out-of-memory step raises and can fall back.
CPU_MEMORY_SHARE = 0.25
CUDA_MEMORY_SHARE = 0.5
#: Allowance for the NFE growing between one decision and the next step (NFE can rise by tens
#: of percent within a few steps while a flow stiffens) and for the solver's own tensors.
HEADROOM = 2.0


def default_memory_share(device: torch.device | str) -> float:
    """The documented default share of free memory direct backprop may use on ``device``."""
    return CUDA_MEMORY_SHARE if torch.device(device).type == "cuda" else CPU_MEMORY_SHARE


def saved_tensor_bytes(fn: Callable[..., Any], *args: Any) -> tuple[Any, int]:
    """Call ``fn(*args)`` and count the bytes autograd saves for its backward pass.

    Leaf tensors that require grad (parameters) are not counted: they are resident anyway.
    Storages are counted once however many views of them are saved. The saved tensors are kept
    detached, so the measured graph is freed with its result; first-order gradients through the
    result are exact, higher-order ones are not available (this is a measuring tool).

    Returns:
        ``(fn's result, bytes)``.

    Example:
        >>> w = torch.randn(3, 4, requires_grad=True)
        >>> x = torch.randn(5, 3)
        >>> _, n = saved_tensor_bytes(lambda v: torch.tanh(v @ w), x)
        >>> n == (5 * 3 + 5 * 4) * 4  # x for the matmul's gradient, tanh's output
        True
    """
    seen: set[tuple[int, int]] = set()
    total = 0

    def pack(t: Tensor) -> Tensor:
        nonlocal total
        if not (t.is_leaf and t.requires_grad):
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        # Detached: an op that saves its own output (tanh) would otherwise hold that output
        # through its own graph node, a cycle the garbage collector cannot see, and the measured
        # evaluation would never be freed. Same data: first-order gradients through the
        # result are unchanged (higher-order ones do not flow through detached saved tensors).
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, total


#: (limit, usage) files of the cgroup memory controller: version 2, then version 1.
CGROUP_FILES: tuple[tuple[str, str], ...] = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))
#: The kernel's memory report (its ``MemAvailable`` line).
MEMINFO = "/proc/meminfo"


def _cgroup_available() -> float:
    """Bytes left under this process's cgroup memory limit (inf where there is none).

    A limit of ``max`` (v2) or a huge number (v1's "unlimited") means none; unreadable or
    corrupt files are skipped.
    """
    for limit_file, usage_file in CGROUP_FILES:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            return float(max(int(limit) - usage, 0))
    return math.inf


def available_memory(device: torch.device | str) -> int:
    """Bytes free for new tensors on ``device``.

    CUDA: the driver's free memory plus what PyTorch's caching allocator holds unused. CPU:
    ``MemAvailable`` from /proc/meminfo, capped by the cgroup limit (containers); 0 where neither
    can be read, which makes :func:`choose_backprop` pick memory-bounded backprop (the safe
    side).
    """
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + max(cached, 0))
    available = 0.0
    try:
        with open(MEMINFO) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = float(line.split()[1]) * 1024
                    break
    except OSError:
        try:
            available = float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            available = 0.0
    return int(min(available, _cgroup_available()))


def choose_backprop(bytes_per_evaluation: int, forward_nfe: int, free_bytes: int,
                    share: float, headroom: float = HEADROOM) -> str:
    r"""``"direct"`` if the step's activations fit the budget, else ``"memory_bounded"``.

    .. math:: \text{NFE} \cdot M_\text{eval} \cdot \text{headroom} \le
              \text{share} \cdot M_\text{free}

    Args:
        bytes_per_evaluation: Bytes autograd keeps per evaluation of the field
            (:func:`saved_tensor_bytes`).
        forward_nfe: Forward evaluations of one solve (the largest seen recently).
        free_bytes: Free memory (:func:`available_memory`).
        share: Share of the free memory direct backprop may take, in (0, 1].
        headroom: Safety factor for NFE growth and the solver's own tensors (>= 1).

    Example:
        >>> choose_backprop(1_000_000, 50, free_bytes=10**9, share=0.25)
        'direct'
        >>> choose_backprop(1_000_000, 5_000, free_bytes=10**9, share=0.25)
        'memory_bounded'
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share!r}")
    if headroom < 1:
        raise ValueError(f"headroom must be >= 1, got {headroom!r}")
    need = float(bytes_per_evaluation) * max(int(forward_nfe), 1) * headroom
    return "direct" if need <= share * float(free_bytes) else "memory_bounded"
