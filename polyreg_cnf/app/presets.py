"""Published hyperparameters per data set, in one place (the paper's run scripts, shared DATA.md).

Every preset is a plain dict of run-configuration option names (the fields of
:class:`polyreg_cnf.app.config.RunConfig`, e.g. ``lr``, ``hidden_dims``, ``atol``) holding only
what the data set changes: the rest is each component's own default (the model's, the flow's,
the solver's; :func:`polyreg_cnf.app.schema.model_defaults`). :func:`polyreg_cnf.app.config.
resolve` fills the options a user did not give from the preset of the data set, and options
given on the command line or in a config file win.

Example:
    >>> preset_for("power", "tabular")["hdim_factor"]
    10
    >>> preset_for("digits", "image")["z_dim"]
    16
    >>> preset_for("moons", "toy")  # the defaults are the toy network
    {}
"""

from __future__ import annotations

from typing import Any

from polyreg_cnf.callbacks.selection import LR_DROP_FFJORD

__all__ = ["DATA_KINDS", "PRESETS", "TABLE_PRESET", "TABULAR_SELECTION", "TOY_PRESET",
           "VAE_PRESETS", "preset_for"]

#: The families of data a run can name (see :func:`polyreg_cnf.app.config.data_kind`).
DATA_KINDS = ("toy", "tabular", "table", "image")

# hidden_dims=None: the widths are hdim_factor x D (D known once the data is read), nhidden times.
_TABULAR = dict(hidden_dims=None)

#: Model selection on the standard tabular sets, as FFJORD's tabular script does it (its network,
#: learning rate and batch are the ones these presets use): validate every 200 iterations, divide
#: the learning rate by 10 after 10 and again after 20 validations without a lower validation
#: NLL, stop after 30, test the best validation model (MAF stops after 30 epochs without
#: improvement). See :class:`polyreg_cnf.callbacks.selection.LearningRateDrops`.
TABULAR_SELECTION: dict[str, Any] = dict(val_every=200, early_stop_patience=30,
                                         lr_drop=LR_DROP_FFJORD)

#: Density estimation on the tabular sets: hidden width = hdim_factor x D, all "concat" except
#: BSDS300.
PRESETS: dict[str, dict[str, Any]] = {
    "power": dict(_TABULAR, **TABULAR_SELECTION, nonlinearity="tanh", nhidden=3,
                  hdim_factor=10, num_blocks=5, layer_type="concat", batch_size=10000),
    "gas": dict(_TABULAR, **TABULAR_SELECTION, nonlinearity="tanh", nhidden=3, hdim_factor=20,
                num_blocks=5, layer_type="concat", batch_size=1000),
    "hepmass": dict(_TABULAR, **TABULAR_SELECTION, nonlinearity="softplus", nhidden=2,
                    hdim_factor=10, num_blocks=10, layer_type="concat", batch_size=10000),
    "miniboone": dict(_TABULAR, **TABULAR_SELECTION, nonlinearity="softplus", nhidden=2,
                      hdim_factor=20, num_blocks=1, layer_type="concat", batch_size=1000),
    "bsds300": dict(_TABULAR, **TABULAR_SELECTION, nonlinearity="tanh", nhidden=3,
                    hdim_factor=20, num_blocks=2, layer_type="concatsquash", batch_size=10000),
}

#: 2-D toys: FFJORD's toy network (three hidden layers of 64, concatsquash, tanh, one block,
#: lr 1e-3, batch 512) is what every default gives (:class:`~polyreg_cnf.models.
#: CNFDensityEstimator`'s arguments, read by the run configuration), so it needs no entry.
TOY_PRESET: dict[str, Any] = {}

#: The user's own table: a mid-sized tabular network, stopped after 20 validations without a
#: lower validation NLL, with FFJORD's learning-rate drops (after 6 and 13 of them). Its
#: validation cadence depends on the number of rows, known once the file is read
#: (:func:`polyreg_cnf.datamodules.user_table.validation_interval`): a table of a few hundred
#: rows overfits within a few hundred steps.
TABLE_PRESET: dict[str, Any] = dict(_TABULAR, nonlinearity="softplus", nhidden=2, hdim_factor=10,
                                    num_blocks=2, layer_type="concat", batch_size=512,
                                    early_stop_patience=20, lr_drop=LR_DROP_FFJORD)

#: The VAE with a CNF posterior, per image set: FFJORD's published settings (shared DATA.md) and
#: a small, fast setting for the embedded 8 x 8 digits. The published MNIST VAE is
#: :class:`~polyreg_cnf.models.vae.CNFVAE`'s defaults (z_dim 64, amortized posterior of rank 64,
#: two blocks of a 1024-1024 softplus net, T 0.5, feature 256, Adamax lr 5e-4, KL warm-up over
#: 100 epochs, 1000 importance samples 10 at a time, the solver's dopri5 at 1e-4 / 1e-5); each
#: entry holds what differs from them.
VAE_PRESETS: dict[str, dict[str, Any]] = {
    "mnist": dict(batch_size=100),
    "static_mnist": dict(batch_size=100),
    "omniglot": dict(batch_size=100, rank=20, hidden_dims=[512, 512], num_blocks=5),
    "freyfaces": dict(batch_size=100, rank=20, hidden_dims=[512, 512]),
    "caltech": dict(batch_size=100, rank=20, hidden_dims=[2048], num_blocks=1,
                    nonlinearity="tanh"),
    "digits": dict(batch_size=100, z_dim=16, feature_dim=64, rank=4,
                   hidden_dims=[64, 64], num_blocks=1, lr=2e-3, warmup_epochs=10,
                   is_samples=200, is_chunk=100, max_epochs=30),
}


def preset_for(name: str, kind: str) -> dict[str, Any]:
    """A copy of the preset of data set ``name`` of family ``kind``.

    Args:
        name: The data set (lower case): a toy density, a tabular or image set, or a file.
        kind: One of :data:`DATA_KINDS`.

    Returns:
        Option name -> value (a fresh dict: the caller may change it).

    Raises:
        ValueError: ``kind`` is unknown, or ``name`` has no preset of that kind.
    """
    if kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {kind!r}; valid: {', '.join(DATA_KINDS)}")
    if kind == "toy":
        return dict(TOY_PRESET)
    if kind == "table":
        return dict(TABLE_PRESET)
    table = PRESETS if kind == "tabular" else VAE_PRESETS
    if name not in table:
        raise ValueError(f"no {kind} preset named {name!r}; valid: {', '.join(table)}")
    return dict(table[name])
