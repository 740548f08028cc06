"""FlowConfig: one typed flow config from the command line down, each default written once."""

import dataclasses
import inspect
from types import SimpleNamespace

import pytest
import torch

from polyreg_cnf import CNF, FlowConfig, ODENet, SolverConfig
from polyreg_cnf.app.build import make_model
from polyreg_cnf.app.config import OPTIONS, make_parser, model_defaults, resolve
from polyreg_cnf.app.presets import PRESETS, TABLE_PRESET, VAE_PRESETS
from polyreg_cnf.engine.amortized import FlowPosterior
from polyreg_cnf.models import CNFVAE, CNFDensityEstimator

FLOW_FIELDS = [f.name for f in dataclasses.fields(FlowConfig)]


def test_the_network_flags_are_flowconfig_fields():
    group = [spec for spec in OPTIONS.values() if spec.group == "flow"]
    assert [spec.name for spec in group] == FLOW_FIELDS
    for spec, f in zip(group, dataclasses.fields(FlowConfig)):
        assert (spec.default, spec.help, spec.choices) == \
            (f.default, f.metadata["help"], f.metadata["choices"])
    flags = {s for a in make_parser()._actions for s in a.option_strings}
    assert {spec.flag for spec in group} <= flags
    # the run configuration's flow IS a FlowConfig: what build hands to the model
    assert isinstance(resolve({"data": "power"}).flow, FlowConfig)


def test_no_component_restates_a_flow_default():
    for component in (CNF, FlowPosterior, CNFDensityEstimator, CNFVAE):
        params = inspect.signature(component).parameters
        assert "flow" in params and "solver" in params
        restated = sorted(set(params) & set(FLOW_FIELDS))
        assert restated == [], (component.__name__, restated)


def test_the_flat_keywords_of_0_2_build_what_flow_builds():
    flat = dict(hidden_dims=(8,), num_blocks=2, T=0.5, trace="exact", noise="gaussian")
    models = []
    for kwargs in (flat, {"flow": FlowConfig(**flat)}):
        torch.manual_seed(0)
        models.append(CNFDensityEstimator(2, **kwargs))
    assert models[0].hparams == models[1].hparams
    assert models[0].flow_config == FlowConfig(**flat)
    for (k, a), (_, b) in zip(models[0].state_dict().items(), models[1].state_dict().items()):
        assert torch.equal(a, b), k
    block = CNF(ODENet(2, (8,)), FlowConfig(T=0.5), trace="exact")  # flat over flow
    assert (block.end_time, block.trace, block.eval_trace) == (0.5, "exact", "exact")


def test_a_wrong_flow_argument_names_the_new_form():
    with pytest.raises(TypeError, match=r"flow must be a FlowConfig, got tuple .*flow=FlowConfig"):
        CNFDensityEstimator(2, (8, 8))  # 0.2's positional hidden_dims
    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['hiden_dims'\]; .*"
                                        r"hidden_dims"):
        CNF(ODENet(2), hiden_dims=(8,))
    with pytest.raises(ValueError, match="unknown divergence 'x'; valid: auto, forward"):
        FlowConfig(divergence="x")
    with pytest.raises(ValueError, match="num_blocks must be a positive int, got 0"):
        FlowConfig(num_blocks=0)
    with pytest.raises(ValueError, match="give hidden_dims, or hdim_factor and nhidden"):
        CNFDensityEstimator(2, FlowConfig(hidden_dims=None, hdim_factor=3))


def test_the_vae_defaults_reach_model_vae_and_show_in_help():
    own = model_defaults("vae")
    assert own["lr"] == inspect.signature(CNFVAE).parameters["lr"].default
    flow = CNFVAE.default_flow
    assert {k: own[k] for k in ("T", "hidden_dims", "num_blocks")} == \
        {"T": flow.T, "hidden_dims": flow.hidden_dims, "num_blocks": flow.num_blocks}
    # MNIST's preset changes only the batch size: the rest is CNFVAE's own defaults
    config = resolve({"model": "vae", "data": "mnist"})
    assert config.flow == flow and config.training.lr == own["lr"]
    built = make_model(config, SimpleNamespace(image_shape=(1, 28, 28), likelihood="bernoulli"))
    assert built.flow_config == CNFVAE((1, 28, 28)).flow_config
    assert model_defaults("cnf") == {}
    help_text = " ".join(make_parser().format_help().split())
    assert "end time of each block (default: 1.0; --model vae: 0.5)" in help_text


def test_a_vae_preset_holds_only_what_it_changes():
    base = {name: spec.default for name, spec in OPTIONS.items()} | model_defaults("vae")
    for name, preset in VAE_PRESETS.items():
        for key, value in preset.items():
            value = tuple(value) if isinstance(value, list) else value
            assert value != base[key], f"{name}: {key}={value!r} is the default already"


def test_no_preset_restates_the_solver_or_the_blocks_defaults():
    for preset in [*PRESETS.values(), TABLE_PRESET, *VAE_PRESETS.values()]:
        restated = {k for k in ("atol", "rtol", "eval_atol", "eval_rtol", "solver", "T",
                                "trace", "eval_trace", "noise", "divergence") if k in preset}
        assert not restated, preset
    for model, data in (("cnf", "power"), ("cnf", "t.csv"), ("vae", "omniglot")):
        config = resolve({"model": model, "data": data})
        assert config.ode.atol == SolverConfig().atol
        assert config.flow.trace == FlowConfig().trace


def test_the_solver_flags_default_to_solverconfig():
    assert resolve({}).solver().to_dict() == SolverConfig().to_dict()
    assert resolve({"model": "vae"}).solver().to_dict() == SolverConfig().to_dict()
