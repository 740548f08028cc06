"""Published hyperparameters per data set (the paper's run scripts, see shared DATA.md).

Values are plain dicts of train.py option names; command-line flags override them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["PRESETS", "preset_for"]

_TABULAR = dict(lr=1e-3, T=1.0, trace="hutchinson", eval_trace="exact")

PRESETS: dict[str, dict[str, Any]] = {
    # Tabular: hidden width = hdim_factor x D, all "concat" except BSDS300.
    "power": dict(_TABULAR, nonlinearity="tanh", nhidden=3, hdim_factor=10, num_blocks=5,
                  layer_type="concat", batch_size=10000),
    "gas": dict(_TABULAR, nonlinearity="tanh", nhidden=3, hdim_factor=20, num_blocks=5,
                layer_type="concat", batch_size=1000),
    "hepmass": dict(_TABULAR, nonlinearity="softplus", nhidden=2, hdim_factor=10,
                    num_blocks=10, layer_type="concat", batch_size=10000),
    "miniboone": dict(_TABULAR, nonlinearity="softplus", nhidden=2, hdim_factor=20,
                      num_blocks=1, layer_type="concat", batch_size=1000),
    "bsds300": dict(_TABULAR, nonlinearity="tanh", nhidden=3, hdim_factor=20, num_blocks=2,
                    layer_type="concatsquash", batch_size=10000),
}

#: 2-D toys: FFJORD's toy network (three hidden layers of 64, concatsquash, tanh, one block).
TOY_PRESET: dict[str, Any] = dict(lr=1e-3, T=1.0, hidden_dims=[64, 64, 64],
                                  layer_type="concatsquash", nonlinearity="tanh", num_blocks=1,
                                  batch_size=512, trace="hutchinson", eval_trace="exact")

#: The user's own table: a mid-sized tabular network.
TABLE_PRESET: dict[str, Any] = dict(_TABULAR, nonlinearity="softplus", nhidden=2, hdim_factor=10,
                                    num_blocks=2, layer_type="concat", batch_size=512)


def preset_for(name: str, kind: str) -> dict[str, Any]:
    """Preset of a data set (``kind`` is "toy", "tabular" or "table")."""
    if kind == "toy":
        return dict(TOY_PRESET)
    if kind == "tabular":
        return dict(PRESETS[name])
    return dict(TABLE_PRESET)
