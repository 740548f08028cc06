"""The run configuration: one typed definition, its command line, files, presets and build."""

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from polyreg_cnf.callbacks import KineticRegularizer, NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.callbacks.guard import RunGuard
from polyreg_cnf.callbacks.plots import TrajectoryPlotter
from polyreg_cnf.callbacks.selection import LastCheckpoint
from polyreg_cnf.datamodules.images import IMAGE_DATASETS

from polyreg_cnf.app import config as C
from polyreg_cnf.app.build import build
from polyreg_cnf.app.config import (
    ConfigError,
    command_line,
    dump_config,
    load_config,
    make_parser,
    parse_command_line,
    resolve,
)
from polyreg_cnf.app.presets import PRESETS, TABLE_PRESET, TOY_PRESET, VAE_PRESETS
from polyreg_cnf.app.run_logging import LOGGER_KINDS
from polyreg_cnf.engine.amortized import POSTERIORS
from polyreg_cnf.engine.cnf import DIVERGENCE_MODES, TRACE_TYPES
from polyreg_cnf.engine.nets import LAYER_TYPES, NONLINEARITIES
from polyreg_cnf.engine.solver_config import FIXED_METHODS, METHODS
from polyreg_cnf.engine.strategies import BACKPROP_KINDS
from polyreg_cnf.engine.trace import NOISE_TYPES
from polyreg_cnf.models import CNFDensityEstimator
from polyreg_cnf.models.vae import ARCHITECTURES, CNFVAE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train  # noqa: E402

PARSER = make_parser()


def parse(argv):
    return resolve(parse_command_line(PARSER, argv)[0])


def options():
    return C.OPTIONS


# ------------------------------------------------------------------------------ choices
REGISTRIES = {
    "model": ("cnf", "vae"), "reg": ("none", "poly", "kinetic"),
    "layer_type": tuple(LAYER_TYPES), "nonlinearity": tuple(NONLINEARITIES),
    "trace": TRACE_TYPES, "eval_trace": TRACE_TYPES, "noise": NOISE_TYPES,
    "divergence": DIVERGENCE_MODES,
    "posterior": POSTERIORS, "architecture": ARCHITECTURES,
    "solver": METHODS, "logger": LOGGER_KINDS,
    "eval_solver": METHODS,
    "backprop": tuple(BACKPROP_KINDS), "poly_preset": ("paper",),
    "lr_schedule": ("constant", "cosine"), "test_ckpt": ("best", "last"),
}


def _net(**kwargs):
    from polyreg_cnf.engine.nets import ODENet

    return ODENet(2, (4,), **kwargs)


def _cnf(**kwargs):
    from polyreg_cnf.engine.cnf import CNF

    return CNF(_net(), **kwargs)


def _solver(**kwargs):
    from polyreg_cnf.engine.solver_config import SolverConfig

    return SolverConfig(**kwargs)


def _vae(**kwargs):
    return CNFVAE((1, 28, 28), z_dim=2, hidden_dims=(4,), rank=1, feature_dim=4, mlp_hidden=4,
                  **kwargs)


# The component that consumes each option, built with one value of it: the choices the command
# line offers must be the values the component itself accepts, no more and no fewer.
CONSUMERS = {
    "layer_type": lambda v: _net(layer_type=v), "nonlinearity": lambda v: _net(nonlinearity=v),
    "trace": lambda v: _cnf(trace=v), "eval_trace": lambda v: _cnf(eval_trace=v),
    "noise": lambda v: _cnf(noise=v), "divergence": lambda v: _cnf(divergence=v),
    "posterior": lambda v: _vae(posterior=v), "architecture": lambda v: _vae(architecture=v),
    "solver": lambda v: _solver(method=v, step_size=0.1), "backprop": lambda v: _solver(backprop=v),
    "eval_solver": lambda v: _solver(eval_method=v, eval_steps=2 if v in FIXED_METHODS else None),
    "poly_preset": PolynomialTrajectoryRegularizer.from_preset,
    "lr_schedule": lambda v: CNFDensityEstimator(2, lr_schedule=v),
}


def _listed_in(message):
    """The valid values a component's error lists ("...; valid: a, b" or "must be one of a, b,
    got ..." / "... or a Backprop object")."""
    import re

    found = re.search(r"(?:valid: |must be one of )(.*?)(?: or a \w+ object)?(?:, got .*)?$",
                      message)
    assert found, message
    return tuple(found.group(1).split(", "))


def test_every_choice_list_is_its_registry():
    with_choices = {n: s.choices for n, s in options().items() if s.choices is not None}
    assert with_choices == REGISTRIES
    for action in PARSER._actions:  # the flags offer the same lists
        if action.dest in REGISTRIES:
            assert tuple(action.choices) == REGISTRIES[action.dest], action.dest
    # model, reg and logger are the registries checked below; test_ckpt is no component's
    # setting (build.tested_weights reads the checked option).
    assert set(CONSUMERS) == set(with_choices) - {"model", "reg", "logger", "test_ckpt"}
    for name, consume in CONSUMERS.items():
        for choice in with_choices[name]:  # every offered value builds its component ...
            consume(choice)
        with pytest.raises(ValueError) as info:  # ... which accepts exactly those values
            consume("bogus")
        assert _listed_in(str(info.value)) == with_choices[name], name
    assert {"explicit_adams", "implicit_adams"} <= set(with_choices["solver"])
    assert C.REGULARIZERS == {"none": None, "poly": PolynomialTrajectoryRegularizer,
                              "kinetic": KineticRegularizer}
    assert C.MODELS == {"cnf": CNFDensityEstimator, "vae": CNFVAE}


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_a_bad_choice_echoes_the_value_and_lists_the_choices(name, capsys):
    flag = options()[name].flag
    with pytest.raises(SystemExit) as info:
        PARSER.parse_args([flag, "bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: invalid choice: 'bogus'" in err
    assert all(repr(choice) in err for choice in REGISTRIES[name])
    with pytest.raises(ConfigError) as info:  # the same check for a config file or code
        resolve({name: "bogus"})
    assert f"invalid choice 'bogus'; valid: {', '.join(REGISTRIES[name])}" in str(info.value)


@pytest.mark.parametrize("given,message", [
    ({"atol": 0}, "--atol must be a finite number > 0, got 0"),
    ({"batch_size": 2.5}, "--batch-size must be a positive integer, got 2.5"),
    ({"poly_order": -1}, "--poly-order must be an integer >= 0, got -1"),
    ({"hidden_dims": [64, 0]}, "--hidden-dims must be comma-separated positive widths like "
                               "64,64,64, got [64, 0]"),
    ({"seminorm": "yes"}, "--seminorm must be true or false, got 'yes'"),
    ({"memory_share": 2.0},
     "--backprop auto: Auto: memory_share must be a number in (0, 1] or None, got 2.0"),
    ({"lr": float("nan")}, "--lr must be a finite number > 0, got nan"),
    ({"devices": "two"}, "--devices must be a positive integer or 'auto', got 'two'"),
    ({"seminorm": True, "backprop": "direct"}, "--seminorm does not apply to --backprop direct"),
    ({"seminorm": True, "backprop": "checkpoint"},
     "--seminorm does not apply to --backprop checkpoint"),
    ({"backprop": "checkpoint", "solver": "implicit_adams", "step_size": 0.1},
     "--solver implicit_adams --backprop checkpoint: StepCheckpoint redoes single "
     "Runge-Kutta steps: method 'implicit_adams' cannot be recomputed"),
    ({"backprop": "checkpoint", "train_T": True},
     "StepCheckpoint cannot learn the end time (train_T=True)"),
    ({"data": "power", "hidden_dims": None, "nhidden": None},
     "give --hidden-dims, or --hdim-factor and --nhidden"),
    ({"lrate": 1}, "unknown options ['lrate']; valid: model, reg, data"),
])
def test_bad_values_name_the_option_and_echo_the_value(given, message):
    with pytest.raises(ConfigError) as info:
        resolve(given)
    assert message in str(info.value)


@pytest.mark.parametrize("argv,message", [
    (["--threads", "0"], "argument --threads: expected a positive integer, got '0'"),
    (["--T", "-1"], "argument --T: expected a finite number > 0, got '-1'"),
    (["--lr", "inf"], "argument --lr: expected a finite number > 0, got 'inf'"),
    (["--conf", "x.yaml"], "unrecognized arguments: --conf"),  # no abbreviations
])
def test_bad_flags_echo_the_text(argv, message, capsys):
    with pytest.raises(SystemExit):
        PARSER.parse_args(argv)
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------ flags
def test_todays_flag_spellings_and_behaviours():
    c = parse(["--model", "vae", "--reg", "poly"])
    assert (c.model, c.data, c.reg, c.vae.z_dim, c.flow.hidden_dims) == \
        ("vae", "digits", "poly", 16, (64, 64))
    c = parse(["--backprop", "direct", "--hidden-dims", "32,16", "--no-test", "--no-progress",
               "--solver", "implicit_adams", "--step-size", "0.1", "--T", "0.5", "--train-T",
               "--limit-val-batches", "0", "--devices", "auto"])
    assert (c.ode.backprop, c.flow.hidden_dims, c.training.test, c.output.progress) == \
        ("direct", (32, 16), False, False)
    assert (c.ode.solver, c.ode.step_size, c.flow.T, c.flow.train_T) == \
        ("implicit_adams", 0.1, 0.5, True)
    assert parse(["--hidden-dims", "8-8"]).flow.hidden_dims == (8, 8)  # old dash spelling
    assert parse(["--progress"]).output.progress is True
    assert parse([]).output.progress is None  # decided at run time (a terminal or not)


def test_flags_override_presets_and_presets_fill_the_rest():
    c = parse(["--data", "power", "--lr", "0.1", "--num-blocks", "2"])
    assert (c.training.lr, c.flow.num_blocks) == (0.1, 2)
    assert (c.flow.hidden_dims, c.flow.hdim_factor, c.flow.nhidden, c.training.batch_size) == \
        (None, 10, 3, 10000)
    assert parse(["--data", "moons"]).flow.hidden_dims == (64, 64, 64)
    assert parse(["--data", "t.csv"]).flow.nonlinearity == "softplus"
    c = parse([])
    assert (c.data, c.training.max_steps, c.training.max_epochs) == ("checkerboard", 1000, None)
    c = parse(["--max-epochs", "3"])
    assert (c.training.max_steps, c.training.max_epochs) == (None, 3)


def test_every_preset_key_is_an_option_and_every_image_set_has_a_preset():
    for preset in [*PRESETS.values(), TOY_PRESET, TABLE_PRESET, *VAE_PRESETS.values()]:
        assert set(preset) <= set(options()), set(preset) - set(options())
    assert set(VAE_PRESETS) == set(IMAGE_DATASETS)
    for name in IMAGE_DATASETS:
        c = resolve({"model": "vae", "data": name})
        assert {k: c.flat()[k] for k in VAE_PRESETS[name]} == \
            {k: tuple(v) if isinstance(v, list) else v for k, v in VAE_PRESETS[name].items()}


@pytest.mark.parametrize("argv", [
    [],
    ["--model", "vae", "--reg", "none", "--posterior", "gaussian", "--is-samples", "0"],
    ["--data", "power", "--backprop", "adjoint", "--lr", "1e-05", "--seed", "-3",
     "--max-epochs", "2"],
    ["--data", "t.npz", "--reg", "kinetic", "--kinetic-coef", "0.5", "--columns", "a,2",
     "--progress", "--logger", "csv", "--val-every", "7", "--hidden-dims", "5"],
])
def test_flags_config_flags_round_trip(argv):
    config = parse(argv)
    again = command_line(config)
    assert parse(again) == config
    assert command_line(parse(again)) == again


def test_a_value_no_flag_can_give_is_refused_by_command_line():
    config = resolve({"data": "moons"}).replace(hidden_dims=None, hdim_factor=2, nhidden=1)
    with pytest.raises(ConfigError, match=r"options \['hidden_dims'\]"):
        command_line(config)


# ------------------------------------------------------------------------------ files
def test_config_file_then_flags_override_it_and_flags_before_it_do_not(tmp_path):
    stored = parse(["--data", "power", "--lr", "0.25", "--seed", "4"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(stored))
    assert parse(["--config", str(path)]) == stored
    after = parse(["--config", str(path), "--lr", "0.5"])
    assert after == stored.replace(lr=0.5)
    before = parse(["--lr", "0.5", f"--config={path}"])
    assert before == stored
    # The file holds the resolved values: changing --data keeps the stored network.
    moved = parse(["--config", str(path), "--data", "gas"])
    assert (moved.data, moved.flow.hdim_factor, moved.flow.nhidden) == ("gas", 10, 3)


def test_config_file_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("ode:\n  atol: 1e-4\n  method: rk4\n")
    with pytest.raises(ConfigError, match=r"unknown options \['method'\]"):
        load_config(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of options, got list"):
        load_config(bad)
    ok = tmp_path / "ok.yaml"
    ok.write_text("ode:\n  atol: 1e-3\nlr: 2e-3\n")  # YAML 1.1 reads 1e-3 as a string
    assert load_config(ok) == {"atol": 1e-3, "lr": 2e-3}


def test_print_config_prints_a_loadable_config_and_exits(tmp_path, capsys):
    assert train.main(["--data", "power", "--lr", "0.01", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# polyreg-cnf run configuration")
    assert yaml.safe_load(out)["ode"]["solver"] == "dopri5"
    path = tmp_path / "printed.yaml"
    path.write_text(out)
    assert parse(["--config", str(path)]) == parse(["--data", "power", "--lr", "0.01"])
    assert not Path("runs").exists()  # nothing was built


def test_train_py_rejects_a_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--config", str(tmp_path / "none.yaml")])
    assert info.value.code == 2
    assert "none.yaml" in capsys.readouterr().err


# ------------------------------------------------------------------------------ build
FAST = {"data": "8gaussians", "hidden_dims": (8,), "batch_size": 64, "atol": 1e-3,
        "rtol": 1e-3, "eval_atol": 1e-3, "eval_rtol": 1e-3, "accelerator": "cpu",
        "max_steps": 2, "plot_every": 0}


def _types(callbacks):
    return [type(c) for c in callbacks]


def test_run_folder_holds_the_resolved_config_and_a_rerun_reproduces_it(tmp_path, capsys):
    assert train.main(["--data", "8gaussians", "--hidden-dims", "8", "--max-steps", "2",
                       "--batch-size", "64", "--atol", "1e-3", "--rtol", "1e-3", "--logger",
                       "csv", "--accelerator", "cpu", "--output-dir", str(tmp_path)]) == 0
    run = tmp_path / "cnf-8gaussians-poly-s0"
    stored = parse(["--config", str(run / "config.yaml")])
    assert stored == parse(["--data", "8gaussians", "--hidden-dims", "8", "--max-steps", "2",
                            "--batch-size", "64", "--atol", "1e-3", "--rtol", "1e-3",
                            "--logger", "csv", "--accelerator", "cpu", "--output-dir",
                            str(tmp_path)])
    assert f"configuration:              {run / 'config.yaml'}" in capsys.readouterr().out
    # --config runs it again from scratch, in a new folder, with a flag overriding the file.
    assert train.main(["--config", str(run / "config.yaml"), "--seed", "1"]) == 0
    rerun = tmp_path / "cnf-8gaussians-poly-s1"
    assert parse(["--config", str(rerun / "config.yaml")]) == stored.replace(seed=1)
    assert yaml.safe_load((rerun / "hparams.yaml").read_text())["seed"] == 1


@pytest.mark.parametrize("reg,cls", [("none", None), ("poly", PolynomialTrajectoryRegularizer),
                                     ("kinetic", KineticRegularizer)])
def test_build_makes_the_callbacks_and_loggers_the_config_asks_for(reg, cls, tmp_path):
    config = resolve({**FAST, "reg": reg, "logger": "csv", "output_dir": str(tmp_path),
                      "poly_coef": 2.0, "poly_samples": 3, "poly_order": 2,
                      "kinetic_coef": 0.5, "jacobian_coef": 0.25, "ckpt_every": 7,
                      "plot_every": 5, "progress": False, "val_every": 3, "max_steps": 9})
    run = build(config)
    kinds = _types(run.trainer.callbacks)
    assert kinds[:2] == [NFEMonitor, RunGuard]
    regs = [c for c in run.trainer.callbacks
            if isinstance(c, (PolynomialTrajectoryRegularizer, KineticRegularizer))]
    if cls is None:
        assert regs == []
    else:
        assert _types(regs) == [cls]
    if cls is PolynomialTrajectoryRegularizer:
        assert (regs[0].coef, regs[0].num_samples, regs[0].order) == (2.0, 3, 2)
    if cls is KineticRegularizer:
        assert (regs[0].kinetic_coef, regs[0].jacobian_coef) == (0.5, 0.25)
    ckpt = [c for c in run.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert ckpt == [run.best] and ckpt[0].monitor == "val/nll"  # best.ckpt
    assert ckpt[0].dirpath == str(run.run_dir / "checkpoints")
    last = [c for c in run.trainer.callbacks if isinstance(c, LastCheckpoint)]
    assert len(last) == 1 and last[0].every_n_steps == 7 and last[0].path == run.guard.last_path
    plotter = [c for c in run.trainer.callbacks if isinstance(c, TrajectoryPlotter)]
    assert len(plotter) == 1 and plotter[0].every_n_steps == 5
    assert _types(run.trainer.loggers) == [CSVLogger]
    assert (run.trainer.max_steps, run.trainer.val_check_interval) == (9, 3)
    assert run.trainer.progress_bar_callback is None
    assert run.model.solver.atol == 1e-3 and run.model.hparams["flow"]["hidden_dims"] == [8]
    assert yaml.safe_load((run.run_dir / "config.yaml").read_text())["reg"] == reg


def test_build_extension_points(tmp_path):
    from lightning.pytorch.plugins.io import TorchCheckpointIO
    from polyreg_cnf.datamodules.toy import ToyDataModule

    from polyreg_cnf.models.checkpoint import AtomicCheckpointIO

    class Mine(NFEMonitor):
        pass

    dm = ToyDataModule("8gaussians", num_train=128, num_val=32, num_test=32, batch_size=32)
    config = resolve({**FAST, "logger": "none", "ckpt_every": 0, "output_dir": str(tmp_path)})
    run = build(config, datamodule=dm, callbacks=[Mine()],
                trainer_kwargs={"limit_test_batches": 1, "max_steps": 1})
    assert run.datamodule is dm and run.trainer.loggers == []
    # the caller's last (Lightning moves its checkpoint callbacks after every other one)
    assert isinstance(run.callbacks[-1], Mine) and run.callbacks[-1] in run.trainer.callbacks
    # --ckpt-every 0: no periodic save, but the best validation checkpoint is still kept
    assert [c for c in run.trainer.callbacks if isinstance(c, ModelCheckpoint)] == [run.best]
    assert (run.trainer.max_steps, run.trainer.limit_test_batches) == (1, 1)
    assert isinstance(run.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert isinstance(run.trainer.strategy.checkpoint_io, TorchCheckpointIO)


def test_build_sizes_tabular_networks_from_the_data(tmp_path):
    import numpy as np

    path = tmp_path / "t.npy"
    np.save(path, np.random.default_rng(0).normal(size=(200, 3)))
    config = resolve({"data": str(path), "accelerator": "cpu", "logger": "none",
                      "output_dir": str(tmp_path / "runs")})
    run = build(config)
    assert run.model.hparams["flow"]["hidden_dims"] == [30, 30]  # hdim_factor 10 x D=3, nhidden 2
    assert run.model.data_mean.shape == (3,)


def test_build_refuses_a_missing_checkpoint_and_a_non_config(tmp_path):
    config = resolve({**FAST, "logger": "none", "output_dir": str(tmp_path / "runs")})
    with pytest.raises(TypeError, match="config must be a RunConfig .*, got dict"):
        build(dataclasses.asdict(config))
    assert not (tmp_path / "runs").exists()  # refused before anything was made
    with pytest.raises(ValueError, match="nope.ckpt' is not a file"):
        build(config, ckpt_path=tmp_path / "nope.ckpt")
    with pytest.raises(ValueError, match="is not a file"):  # a folder is no checkpoint either
        build(config, ckpt_path=tmp_path)
    # an existing file is what the run resumes from
    ckpt = tmp_path / "given.ckpt"
    ckpt.write_bytes(b"")
    assert build(config, ckpt_path=ckpt).ckpt_path == str(ckpt)


def test_poly_preset_gives_the_paper_settings_and_flags_override_it():
    from polyreg_cnf.callbacks.polynomial import POLY_PRESETS

    assert POLY_PRESETS["paper"] == {"coef": 5.0, "num_samples": 2, "order": 1}
    reg = parse(["--reg", "poly"]).regularizer()
    assert (reg.coef, reg.num_samples, reg.order) == (5.0, 2, 1)
    reg = parse(["--reg", "poly", "--poly-preset", "paper", "--poly-coef", "1",
                 "--poly-samples", "4"]).regularizer()
    assert (reg.coef, reg.num_samples, reg.order) == (1.0, 4, 1)
    with pytest.raises(ConfigError, match="--poly-samples must be >= --poly-order, got 2 < 3"):
        resolve({"reg": "poly", "poly_order": 3})
    with pytest.raises(ConfigError, match="invalid choice 'fastest'"):
        resolve({"poly_preset": "fastest"})
    same = PolynomialTrajectoryRegularizer.from_preset("paper", intercept_torchdiffeq=True)
    assert (same.coef, same.num_samples, same.order, same.intercept_torchdiffeq) == \
        (5.0, 2, 1, True)
    with pytest.raises(ValueError, match="unknown poly preset 'x'; valid: paper"):
        PolynomialTrajectoryRegularizer.from_preset("x")


def _plain(hparams):
    """Hyperparameters as plain JSON values (tuples and lists alike)."""
    return json.loads(json.dumps(dict(hparams), default=list))


# The published settings, written out here rather than read from the classes: FFJORD's toy
# network (Grathwohl et al. 2019, 3 x 64 concatsquash, tanh) and its MNIST VAE (z 64, two
# amortized blocks of 1024-1024, rank 64, softplus, T 0.5), both at the TPR paper's tolerances.
PUBLISHED = {
    "cnf": {"hidden_dims": [64, 64, 64], "layer_type": "concatsquash", "nonlinearity": "tanh",
            "num_blocks": 1, "T": 1.0, "trace": "hutchinson", "eval_trace": "exact",
            "noise": "rademacher", "lr": 1e-3},
    "vae": {"z_dim": 64, "posterior": "amortized", "hidden_dims": [1024, 1024], "rank": 64,
            "nonlinearity": "softplus", "num_blocks": 2, "T": 0.5, "trace": "hutchinson",
            "eval_trace": "exact", "lr": 5e-4, "warmup_epochs": 100, "architecture": "conv"},
}


@pytest.mark.parametrize("model,data,shape", [
    ("cnf", "checkerboard", None),  # the toy network is every default
    ("vae", "mnist", (1, 28, 28)),  # FFJORD's published MNIST VAE is CNFVAE's defaults
])
def test_a_directly_built_model_resolves_the_settings_train_py_does(model, data, shape):
    from types import SimpleNamespace

    from polyreg_cnf.callbacks import KineticRegularizer, PolynomialTrajectoryRegularizer

    from polyreg_cnf.app.build import make_model
    from polyreg_cnf.models import CNFDensityEstimator
    from polyreg_cnf.models.vae import CNFVAE

    config = resolve({"model": model, "data": data})
    if model == "cnf":
        built = make_model(config, SimpleNamespace(dim=2))
        direct = CNFDensityEstimator(2)
    else:
        built = make_model(config, SimpleNamespace(image_shape=shape, likelihood="bernoulli"))
        direct = CNFVAE(shape, "bernoulli")
    assert _plain(built.hparams) == _plain(direct.hparams)
    for hparams in (_plain(built.hparams), _plain(direct.hparams)):
        given = {**hparams, **hparams["flow"]}
        assert {k: given[k] for k in PUBLISHED[model]} == PUBLISHED[model]
        # the tolerances in force: 1e-4 while training, 1e-5 in evaluation (paper), dopri5
        assert {k: hparams["solver"][k] for k in ("method", "atol", "rtol", "eval_atol",
                                                  "eval_rtol")} == \
            {"method": "dopri5", "atol": 1e-4, "rtol": 1e-4, "eval_atol": 1e-5, "eval_rtol": 1e-5}
    # the regularizers: the paper's coef 5, K 2, m 1; RNODE's published 0.01 and 0.01
    published = {"poly": {"coef": 5.0, "num_samples": 2, "order": 1, "start_step": 0},
                 "kinetic": {"kinetic_coef": 0.01, "jacobian_coef": 0.01}}
    for reg, cls in (("poly", PolynomialTrajectoryRegularizer), ("kinetic", KineticRegularizer)):
        assert config.replace(reg=reg).regularizer().settings() == cls().settings() == \
            published[reg]
