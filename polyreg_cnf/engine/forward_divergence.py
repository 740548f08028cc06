r"""Forward-mode divergence of the project's own vector fields, as pure functions of tensors.

The reference path (:mod:`polyreg_cnf.engine.trace`) evaluates :math:`f(t, z)` and then asks
reverse-mode autograd for :math:`\epsilon^\top J` (Hutchinson) or for the D rows of the
Jacobian :math:`J = \partial f / \partial z` (exact trace); in training those vector-Jacobian
products keep their graph (``create_graph=True``), so every training step is a double backward.

Here the tangents travel through the layers together with the values. For an MLP

.. math:: a_\ell = M_\ell x_{\ell-1} + (\text{terms free of } z), \qquad x_\ell = \sigma(a_\ell)

a tangent :math:`v` (a direction in z-space) moves as

.. math:: \dot a_\ell = M_\ell \dot x_{\ell-1}, \qquad
          \dot x_\ell = \sigma'(a_\ell) \odot \dot a_\ell, \qquad \dot x_0 = v,

so :math:`\dot x_L = J v` at the cost of one more matmul per layer and tangent. The exact trace
carries the D unit tangents as ONE batched tensor of shape (B, D, width) and sums the diagonal
of the last layer's Jacobian; Hutchinson carries the probe :math:`\epsilon` and returns
:math:`\epsilon^\top (J \epsilon)`, the same number as the reference's
:math:`(\epsilon^\top J) \epsilon`. Every operation is an ordinary differentiable tensor
operation, so a loss built from ``(f, div)`` needs one first-order backward pass.

The Jacobian of every supported layer with respect to its input x is the same kind of map,

.. math:: M_b = W + U_b V_b^\top

(a shared matrix, plus a per-sample low-rank term for :class:`~polyreg_cnf.engine.amortized.
AmortizedODENet`); the helpers :func:`_push` and :func:`_diagonal_sum` act with it on tangents.

Use from a CNF's field (training: z may require grad, ONE backward follows; evaluation: under
``torch.no_grad()``, no graph is built)::

    if supports_forward_divergence(net):  # decided once per block
        dz, div = field_and_divergence(net, t, y, probe=eps, context=context)  # eps None: exact

A net takes part by two methods (so this module knows no net class, and the nets import it,
never the other way round): ``forward_mode_layers(t, z, context)``, its layers as functions
``x -> (value, LayerJacobian)`` built from :func:`concat_layer` and friends, and
``forward_mode_matches()``, whether those compute exactly what its ``forward`` does (False for
a subclass with its own ``forward`` or layers). :class:`~polyreg_cnf.engine.nets.ODENet` and
:class:`~polyreg_cnf.engine.amortized.AmortizedODENet` have them. Fields the check refuses (a
user's module, a plain function) keep the reverse-mode path.

Reference: W. Grathwohl et al., "FFJORD: Free-form Continuous Dynamics for Scalable Reversible
Generative Models", ICLR 2019 (the trace estimators); A. Griewank and A. Walther, "Evaluating
Derivatives", SIAM 2008, ch. 3 (forward-mode propagation of tangents).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polyreg_cnf.engine.factor_grad import factor_bmm

__all__ = ["DERIVATIVES", "compiled_field_and_divergence", "field_and_divergence",
           "supports_forward_divergence"]


# ---------------------------------------------------------------------------------------------
# Nonlinearities: sigma'(a) in closed form from the pre-activation a and/or the output y.
# ---------------------------------------------------------------------------------------------

def tanh_derivative(a: Tensor, y: Tensor) -> Tensor:
    r""":math:`\tanh'(a) = 1 - y^2` from the output (no second transcendental)."""
    return 1 - y * y


def softplus_derivative(a: Tensor, y: Tensor) -> Tensor:
    r""":math:`\operatorname{softplus}'(a) = \sigma(a) = 1/(1 + e^{-a})` (beta 1).

    Above torch's linearisation threshold (a > 20) torch's own derivative is exactly 1;
    :math:`\sigma(a)` differs from it by less than :math:`e^{-20} \approx 2 \cdot 10^{-9}`.
    """
    return torch.sigmoid(a)


def elu_derivative(a: Tensor, y: Tensor) -> Tensor:
    r""":math:`\operatorname{elu}'(a) = 1` for :math:`a > 0`, else :math:`e^a = y + 1` (alpha 1)."""
    return torch.where(a > 0, torch.ones_like(y), y + 1)


def silu_derivative(a: Tensor, y: Tensor) -> Tensor:
    r""":math:`\operatorname{silu}'(a) = \sigma(a)\,(1 + a - y)` with :math:`y = a\,\sigma(a)`.

    From :math:`\sigma + a \sigma (1 - \sigma) = \sigma (1 + a - a\sigma)`.
    """
    s = torch.sigmoid(a)
    return s * (1 + a - y)


def relu_derivative(a: Tensor, y: Tensor) -> Tensor:
    r""":math:`\operatorname{relu}'(a) = [a > 0]` (0 at a = 0, as torch's own backward)."""
    return (a > 0).to(a.dtype)


#: Nonlinearity class of :data:`polyreg_cnf.engine.nets.NONLINEARITIES` -> (value, derivative).
#: The value function is the one the module's forward calls, so values are bit-for-bit equal.
DERIVATIVES: dict[type[nn.Module], tuple[Callable[[Tensor], Tensor],
                                         Callable[[Tensor, Tensor], Tensor]]] = {
    nn.Tanh: (torch.tanh, tanh_derivative),
    nn.Softplus: (F.softplus, softplus_derivative),
    nn.ELU: (F.elu, elu_derivative),
    nn.SiLU: (F.silu, silu_derivative),
    nn.ReLU: (F.relu, relu_derivative),
}

# Settings under which the table's closed forms hold (torch's defaults, which the nets use).
_DEFAULT_SETTINGS: dict[type[nn.Module], dict[str, float]] = {
    nn.Softplus: {"beta": 1.0, "threshold": 20.0}, nn.ELU: {"alpha": 1.0}}


# ---------------------------------------------------------------------------------------------
# Layers: the value and the Jacobian map M_b = W + U_b V_b^T with respect to the input x.
# ---------------------------------------------------------------------------------------------

class LayerJacobian(NamedTuple):
    r"""The layer's Jacobian :math:`M_b = W + s\, U_b V_b^\top` with respect to its input.

    Attributes:
        weight: W, shape (n_out, n_in).
        U: Per-sample left factors (B, n_out, r), or None (no low-rank term).
        V: Per-sample right factors (B, 1 + n_in, r), row 0 the time input's (which has no
            tangent and is skipped), or None.
        scale: The scalar s of the low-rank term (applied to the small (B, K, r) products,
            never to the factors).
        grads: U's and V's gathered-gradient handles
            (:class:`~polyreg_cnf.engine.amortized.FactorGrad`), or None.
    """

    weight: Tensor
    U: Tensor | None = None
    V: Tensor | None = None
    scale: float = 1.0
    grads: tuple[Any, Any] = (None, None)


def concat_layer(t: Tensor, x: Tensor, weight: Tensor,
                 bias: Tensor) -> tuple[Tensor, LayerJacobian]:
    r"""Concat layer :math:`y = W [t; x] + b`; Jacobian :math:`W_{:, 1:}` (time column dropped).

    Same operations as :class:`~polyreg_cnf.engine.nets.ConcatLinear`.
    """
    tt = t.to(x.dtype).expand(x.shape[0], 1)
    y = F.linear(torch.cat([tt, x], dim=1), weight, bias)
    return y, LayerJacobian(weight[:, 1:])


def concatsquash_layer(t: Tensor, x: Tensor, weight: Tensor, bias: Tensor, gate_weight: Tensor,
                       gate_bias: Tensor,
                       shift_weight: Tensor) -> tuple[Tensor, LayerJacobian]:
    r"""Concatsquash layer :math:`y = (W x + b)\,g + d t`, :math:`g = \sigma(a t + c)`.

    Jacobian :math:`\operatorname{diag}(g) W` (the gate scales W's rows once, not every tangent).
    Same operations as :class:`~polyreg_cnf.engine.nets.ConcatSquashLinear`.
    """
    tt = t.to(x.dtype).reshape(1, 1)
    gate = torch.sigmoid(F.linear(tt, gate_weight, gate_bias))
    y = F.linear(x, weight, bias) * gate + F.linear(tt, shift_weight)
    return y, LayerJacobian(weight * gate.reshape(-1, 1))


# ---------------------------------------------------------------------------------------------
# Tangent algebra. The exact trace's tangents are (B, D, n), the D directions of each sample;
# Hutchinson's one direction is (B, n); None stands for the identity (the D unit directions of
# z-space, before the first layer).
# ---------------------------------------------------------------------------------------------

def _push(tangent: Tensor | None, jac: LayerJacobian) -> Tensor:
    r"""The tangents through the layer: :math:`\dot a = M_b \dot x` for every direction.

    Returns (B, K, n_out), or (B, n_out) from Hutchinson's one tangent (B, n_in); from the
    identity, :math:`M_b^\top` itself, i.e. (D, n_out) when the layer has no per-sample term
    (broadcast over the batch later).
    """
    if tangent is None:
        out = jac.weight.t()
        if jac.U is not None and jac.V is not None:
            # W^T + s V U^T in one call: the scale rides on the product, not on a factor.
            out = torch.baddbmm(out.expand(jac.V.shape[0], *out.shape), jac.V[:, 1:],
                                jac.U.transpose(1, 2), alpha=jac.scale)
        return out
    out = F.linear(tangent, jac.weight)
    if jac.U is not None and jac.V is not None:
        many = tangent if tangent.ndim == 3 else tangent.unsqueeze(1)
        # (B, K, r): the small tensor takes the scale; V's row 0 (time) has no tangent.
        projected = factor_bmm(many, jac.V, jac.grads[1], offset=1)
        if jac.scale != 1.0:
            projected = projected * jac.scale
        low_rank = factor_bmm(projected, jac.U, jac.grads[0], transpose=True)
        out = out + (low_rank if tangent.ndim == 3 else low_rank.squeeze(1))
    return out


def _diagonal_sum(tangent: Tensor | None, jac: LayerJacobian) -> Tensor:
    r""":math:`\sum_k (M_b \dot X)_{kk}` for the last layer: the trace without its full product.

    With :math:`\dot X_b` of shape (D, n) holding :math:`\partial x / \partial z_k` in row k,
    the k-th diagonal entry is :math:`\sum_i \dot X_{b,ki} M_{b,ki}`. Returns (B,) (or a scalar
    from the identity when nothing depends on the sample).
    """
    if tangent is None:
        total = torch.diagonal(jac.weight).sum()
        if jac.U is not None and jac.V is not None:
            total = total + jac.scale * (jac.U * jac.V[:, 1:]).sum(dim=(1, 2))
        return total
    total = (tangent * jac.weight).sum(dim=(1, 2))
    if jac.U is not None and jac.V is not None:
        total = total + jac.scale * (factor_bmm(tangent, jac.V, jac.grads[1], offset=1)
                                     * jac.U).sum(dim=(1, 2))
    return total


def _activate(a: Tensor, tangent: Tensor, act: nn.Module,
              many: bool) -> tuple[Tensor, Tensor]:
    r""":math:`(\sigma(a), \sigma'(a) \odot \dot a)`; ``many``: tangents (B, K, n) or (K, n),
    else one per sample, (B, n)."""
    value, derivative = DERIVATIVES[type(act)]
    y = value(a)
    slope = derivative(a, y)
    return y, (slope.unsqueeze(1) if many else slope) * tangent


def _propagate(layers: list[Callable[[Tensor], tuple[Tensor, LayerJacobian]]], act: nn.Module,
               z: Tensor, probe: Tensor | None) -> tuple[Tensor, Tensor]:
    """Run the layers (value, Jacobian) on z with tangents; the nonlinearity between them."""
    x = z
    # Hutchinson's one tangent stays (B, n): plain 2-D matmuls, nothing to fold.
    tangent = probe
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        a, jac = layer(x)
        if i == last:
            if probe is None:
                div = _diagonal_sum(tangent, jac)
                return a, div.expand(z.shape[0]) if div.ndim == 0 else div
            return a, (probe * _push(tangent, jac)).sum(dim=1)
        x, tangent = _activate(a, _push(tangent, jac), act, many=probe is None)
    raise AssertionError("unreachable: a net has at least one layer")


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------

def _has_hooks(net: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in net.modules())


def _act_supported(act: nn.Module) -> bool:
    kind = type(act)
    if kind not in DERIVATIVES:
        return False
    return all(getattr(act, k) == v for k, v in _DEFAULT_SETTINGS.get(kind, {}).items())


def supports_forward_divergence(net: nn.Module) -> bool:
    """Whether :func:`field_and_divergence` computes exactly what ``net(t, z[, context])`` does.

    True for a net with the two methods of the module docstring whose ``forward_mode_matches()``
    holds (:class:`~polyreg_cnf.engine.nets.ODENet` with concat or concatsquash layers,
    :class:`~polyreg_cnf.engine.amortized.AmortizedODENet`), with any nonlinearity the project
    offers (at torch's default settings), and no forward hooks. False for anything else (a
    user's module, a subclass with its own ``forward``): those keep the reverse-mode path of
    :mod:`polyreg_cnf.engine.trace`.

    Example:
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> supports_forward_divergence(ODENet(2, (8,), "concat", "elu"))
        True
        >>> supports_forward_divergence(nn.Linear(2, 2))
        False
    """
    if not isinstance(net, nn.Module) or _has_hooks(net) or not _act_supported(
            getattr(net, "act", None)):
        return False
    matches = getattr(net, "forward_mode_matches", None)
    return callable(matches) and callable(getattr(net, "forward_mode_layers", None)) \
        and bool(matches())


def field_and_divergence(net: nn.Module, t: Tensor, z: Tensor, *, probe: Tensor | None,
                         context: Tensor | tuple[Tensor, ...] | None = None
                         ) -> tuple[Tensor, Tensor]:
    r"""The vector field and its divergence in one forward-mode pass.

    .. math:: f(t, z), \qquad \operatorname{tr} J \;\text{(probe None)} \quad\text{or}\quad
              \epsilon^\top J \epsilon, \qquad J = \partial f / \partial z

    ``f`` is computed with the same operations as ``net``'s forward (bit-for-bit equal values);
    the divergence equals :func:`~polyreg_cnf.engine.trace.divergence_exact` or
    :func:`~polyreg_cnf.engine.trace.divergence_hutchinson` with the same probe to float
    tolerance. Both outputs are ordinary differentiable tensors: a loss built from them needs one
    first-order backward (to the parameters, ``z``, ``t`` and ``context``), and z need not
    require grad. Under ``torch.no_grad()`` no graph is built.

    Cost per evaluation: the value's matmuls plus one matmul per layer on the tangents, which
    are (B, D, width) for the exact trace (the first layer's are the weight itself, the last
    layer's only their diagonal) and (B, width) for Hutchinson.

    Args:
        net: A net for which :func:`supports_forward_divergence` is True.
        t: Time, a scalar tensor.
        z: State, shape (B, D).
        probe: Hutchinson probe, shape (B, D), or None for the exact trace.
        context: Per-sample parameters, shape (B, P), for an
            :class:`~polyreg_cnf.engine.amortized.AmortizedODENet` (and only for it), or the
            factors its ``prepare_context`` made from them (what a CNF block passes: split
            once per solve, not once per evaluation).

    Returns:
        ``(f, div)`` with shapes (B, D) and (B,).

    Raises:
        TypeError: ``net`` is not supported (use the reverse-mode path for it).
        ValueError: ``z``, ``probe`` or ``context`` have the wrong shape.

    Example:
        >>> from polyreg_cnf.engine.nets import ODENet
        >>> net = ODENet(2, (16, 16), "concat", "tanh")
        >>> z = torch.randn(5, 2)
        >>> f, div = field_and_divergence(net, torch.tensor(0.5), z, probe=None)
        >>> bool((f == net(torch.tensor(0.5), z)).all()), tuple(div.shape)
        (True, (5,))
    """
    if z.ndim != 2:
        raise ValueError(f"z must have shape (B, D), got {tuple(z.shape)}")
    if probe is not None and probe.shape != z.shape:
        raise ValueError(f"probe must have z's shape {tuple(z.shape)}, got "
                         f"{tuple(probe.shape)}")
    # The project's own classes as they are (no subclass) need no check per evaluation.
    if not (getattr(net, "forward_mode_native", False) or supports_forward_divergence(net)):
        raise TypeError(f"forward-mode divergence supports ODENet and AmortizedODENet, got "
                        f"{type(net).__name__}; use polyreg_cnf.engine.trace for other fields")
    layers = net.forward_mode_layers(t, z, context)
    if type(net.act) not in DERIVATIVES:
        raise TypeError(f"no closed-form derivative for the nonlinearity "
                        f"{type(net.act).__name__}; valid: "
                        f"{', '.join(k.__name__ for k in DERIVATIVES)}")
    return _propagate(layers, net.act, z, probe)


def _dynamic_batch_entry(net: nn.Module, t: Tensor, z: Tensor, probe: Tensor | None,
                         context: Tensor | tuple[Tensor, ...] | None) -> tuple[Tensor, Tensor]:
    return field_and_divergence(net, t, z, probe=probe, context=context)


def _static_batch_entry(net: nn.Module, t: Tensor, z: Tensor, probe: Tensor | None,
                        context: Tensor | tuple[Tensor, ...] | None) -> tuple[Tensor, Tensor]:
    return field_and_divergence(net, t, z, probe=probe, context=context)


# Two entry points with their own code objects: dynamo caches compiled graphs per code object,
# so the batch-generic graphs and the batch-specialised ones never stand in for each other.
_ENTRIES = {True: _dynamic_batch_entry, False: _static_batch_entry}
_COMPILED: dict[bool, Callable[..., tuple[Tensor, Tensor]]] = {}


def compiled_field_and_divergence(net: nn.Module, t: Tensor, z: Tensor, *,
                                  probe: Tensor | None,
                                  context: Tensor | tuple[Tensor, ...] | None = None,
                                  dynamic_batch: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`field_and_divergence` through ``torch.compile`` (same arguments and results).

    One compiled function serves every net (dynamo guards on the module and the trace mode).
    With ``dynamic_batch`` the batch dimension of ``z`` (and ``probe``, ``context``) is marked
    dynamic, so training and evaluation batches share ONE compiled graph instead of compiling
    again for each new batch size; without it every batch size gets its own specialised graph
    (faster kernels for a fixed size, one compile per size). The first call per net and mode
    pays the compile time.

    Usage (the equality with the eager path is tested in ``tests/test_forward_divergence.py``;
    a compile takes seconds, too long for a docstring example)::

        f, div = compiled_field_and_divergence(net, t, z, probe=eps)  # same as the eager call
    """
    if dynamic_batch not in _COMPILED:
        _COMPILED[dynamic_batch] = torch.compile(_ENTRIES[dynamic_batch], dynamic=False)
    if dynamic_batch:
        # Marked on fresh aliases (views: gradients still flow), not on the caller's tensors,
        # which a batch-specialised call may see later.
        z, probe = (None if x is None else _batch_dynamic(x) for x in (z, probe))
        if isinstance(context, Tensor):
            context = _batch_dynamic(context)
        elif context is not None:  # an amortized net's prepare_context factors
            context = tuple(_batch_dynamic(x) for x in context)
    return _COMPILED[dynamic_batch](net, t, z, probe, context)


def _batch_dynamic(x: Tensor) -> Tensor:
    alias = x.view(x.shape)
    torch._dynamo.mark_dynamic(alias, 0)
    return alias
