"""Time-dependent MLP vector fields of the FFJORD family.

Reference: W. Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from polyreg_cnf.engine._checks import check_int, check_ints

__all__ = ["DEFAULT_HIDDEN_DIMS", "DEFAULT_LAYER_TYPE", "DEFAULT_NONLINEARITY", "LAYER_TYPES",
           "NONLINEARITIES", "ConcatLinear", "ConcatSquashLinear", "ODENet"]

#: FFJORD's toy network, the default vector field of every CNF the project builds (the models and
#: the command line read these): three hidden layers of 64, concatsquash layers, tanh.
DEFAULT_HIDDEN_DIMS = (64, 64, 64)
DEFAULT_LAYER_TYPE = "concatsquash"
DEFAULT_NONLINEARITY = "tanh"


class ConcatLinear(nn.Module):
    r"""Linear layer of :math:`[t, x]`: :math:`y = W [t; x] + b`."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in + 1, dim_out)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.to(x.dtype).expand(x.shape[0], 1)
        return self.linear(torch.cat([tt, x], dim=1))


class ConcatSquashLinear(nn.Module):
    r"""Linear layer gated and shifted by time: :math:`y = (W x + b)\,\sigma(a t + c) + d t`."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.gate = nn.Linear(1, dim_out)
        self.shift = nn.Linear(1, dim_out, bias=False)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        tt = t.to(x.dtype).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)


LAYER_TYPES: dict[str, type[nn.Module]] = {"concat": ConcatLinear,
                                           "concatsquash": ConcatSquashLinear}

NONLINEARITIES: dict[str, type[nn.Module]] = {
    "tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "swish": nn.SiLU,
    "relu": nn.ReLU,
}


class ODENet(nn.Module):
    """MLP vector field f(t, z): time-aware layers with a nonlinearity between them.

    Args:
        dim: State dimension D.
        hidden_dims: Widths of the hidden layers (FFJORD: ``nhidden`` layers of
            ``hdim_factor * D``; see :meth:`from_factor`).
        layer_type: ``"concat"`` or ``"concatsquash"``.
        nonlinearity: ``"tanh"``, ``"softplus"``, ``"elu"``, ``"swish"`` or ``"relu"``.

    Example:
        >>> net = ODENet(2, (16, 16))
        >>> net(torch.tensor(0.5), torch.zeros(3, 2)).shape
        torch.Size([3, 2])
    """

    def __init__(self, dim: int, hidden_dims: Sequence[int] = DEFAULT_HIDDEN_DIMS,
                 layer_type: str = DEFAULT_LAYER_TYPE,
                 nonlinearity: str = DEFAULT_NONLINEARITY) -> None:
        super().__init__()
        check_int("dim", dim)
        hidden_dims = check_ints("hidden_dims", hidden_dims)
        if layer_type not in LAYER_TYPES:
            raise ValueError(f"unknown layer_type {layer_type!r}; valid: "
                             f"{', '.join(LAYER_TYPES)}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"unknown nonlinearity {nonlinearity!r}; valid: "
                             f"{', '.join(NONLINEARITIES)}")
        widths = (dim, *hidden_dims, dim)
        layer = LAYER_TYPES[layer_type]
        self.dim = dim
        self.layers = nn.ModuleList(layer(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.act = NONLINEARITIES[nonlinearity]()

    @classmethod
    def from_factor(cls, dim: int, hdim_factor: int, nhidden: int, layer_type: str = "concat",
                    nonlinearity: str = "tanh") -> ODENet:
        """The FFJORD tabular parametrisation: ``nhidden`` layers of width ``hdim_factor * dim``."""
        check_int("nhidden", nhidden)
        check_int("hdim_factor", hdim_factor)
        return cls(dim, (hdim_factor * dim,) * nhidden, layer_type, nonlinearity)

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = self.act(z)
        return z
