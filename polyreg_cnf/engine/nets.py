"""Time-dependent MLP vector fields of the FFJORD family.

Reference: W. Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from polyreg_cnf.engine._checks import check_int, check_ints
from polyreg_cnf.engine.forward_divergence import LayerJacobian, concat_layer, concatsquash_layer

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
            ``hdim_factor * D``, which ``--hdim-factor``/``--nhidden`` build).
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

    @property
    def forward_mode_native(self) -> bool:
        """Whether this is ODENet itself (no subclass): forward mode matches it by construction."""
        return type(self) is ODENet

    def forward_mode_matches(self) -> bool:
        """Whether :meth:`forward_mode_layers` computes what :meth:`forward` does (the
        forward-mode divergence of :mod:`polyreg_cnf.engine.forward_divergence`)."""
        return type(self).forward is ODENet.forward and all(
            type(layer) in (ConcatLinear, ConcatSquashLinear) for layer in self.layers)

    def forward_mode_layers(self, t: Tensor, z: Tensor, context: object = None
                            ) -> list[Callable[[Tensor], tuple[Tensor, LayerJacobian]]]:
        """The layers at time ``t`` as functions ``x -> (value, Jacobian)``, same operations
        (``z``, the state, is not needed: every sample shares the layers).

        Raises:
            ValueError: A context was given (an ODENet takes none).
        """
        if context is not None:
            raise ValueError("an ODENet takes no context, got a tensor")

        def bind(layer: nn.Module) -> Callable[[Tensor], tuple[Tensor, LayerJacobian]]:
            if isinstance(layer, ConcatSquashLinear):
                return lambda x: concatsquash_layer(t, x, layer.linear.weight, layer.linear.bias,
                                                    layer.gate.weight, layer.gate.bias,
                                                    layer.shift.weight)
            return lambda x: concat_layer(t, x, layer.linear.weight, layer.linear.bias)

        return [bind(layer) for layer in self.layers]

    def forward(self, t: Tensor, z: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = self.act(z)
        return z
