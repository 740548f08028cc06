"""CNF-VAE against closed forms: Gaussian KL, IS bounds, likelihoods, adjoint gradients,
the regularizer callback unchanged, and DDP."""

import math
import os
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from polyreg_cnf.callbacks import NFEMonitor, PolynomialTrajectoryRegularizer
from polyreg_cnf.datamodules.images import DigitsDataModule

from polyreg_cnf import SolverConfig, TrajectoryRecorder
from polyreg_cnf.app.build import make_model
from polyreg_cnf.app.config import resolve
from polyreg_cnf.engine.amortized import AmortizedODENet, FlowPosterior, low_rank_linear
from polyreg_cnf.models.vae import (
    CNFVAE,
    bernoulli_log_prob,
    categorical256_log_prob,
    kl_warmup,
)

TINY = dict(z_dim=4, hidden_dims=[16], rank=2, feature_dim=16, mlp_hidden=32, num_blocks=1)
LOOSE = SolverConfig(atol=1e-4, rtol=1e-4, eval_atol=1e-5, eval_rtol=1e-5)


pytestmark = pytest.mark.usefixtures("one_thread")


def digits_batch(n=32):
    dm = DigitsDataModule()
    dm.setup("test")
    return next(iter(dm.test_dataloader()))[0][:n]


def tiny(posterior="amortized", **kw):
    return CNFVAE((1, 8, 8), "bernoulli", posterior=posterior, solver=LOOSE,
                  **{**TINY, **kw})


def silence_flow(model):
    with torch.no_grad():
        for p in model.flow.parameters():
            p.zero_()


# ---------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("posterior", ["amortized", "cnf"])
def test_zero_dynamics_gives_the_gaussian_posterior_and_its_analytic_kl(posterior):
    torch.manual_seed(0)
    model = tiny(posterior).eval()
    silence_flow(model)  # f = 0: z_K = z_0 and log|det| = 0 exactly
    gauss = tiny("gaussian").eval()
    gauss.load_state_dict(model.state_dict(), strict=False)
    x = digits_batch(4)
    eps = torch.randn(4, TINY["z_dim"])
    with torch.no_grad():
        a = model.elbo_terms(x, eps)
        b = gauss.elbo_terms(x, eps)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=1e-5, atol=1e-5)

    # Monte Carlo KL of the flow model against KL(N(mu, sigma^2) || N(0, I)) in closed form.
    S = 4000
    with torch.no_grad():
        mu, log_sigma, h = model.encode(x)
        rep = lambda t: t.repeat(S, 1)  # noqa: E731
        _, kl = model.log_weights(rep(x), rep(mu), rep(log_sigma), rep(h))
    kl = kl.reshape(S, 4)
    exact = 0.5 * (mu.square() + (2 * log_sigma).exp() - 1 - 2 * log_sigma).sum(-1)
    err = 4 * kl.std(0) / math.sqrt(S)
    assert ((kl.mean(0) - exact).abs() < err + 1e-4).all(), (kl.mean(0), exact, err)


def test_importance_sampled_nll_is_below_the_neg_elbo_and_tightens_with_samples():
    torch.manual_seed(1)
    model = tiny().eval()
    x = digits_batch(32)
    means = {}
    for S in (1, 10, 100):
        nll, neg_elbo = model.importance_nll(x, S, chunk=32)
        assert (nll <= neg_elbo + 1e-4).all()  # Jensen, per image
        means[S] = (nll.mean().item(), neg_elbo.mean().item())
    # An untrained posterior leaves a wide gap: the estimate must fall clearly with S.
    assert means[100][0] < means[10][0] < means[1][0]
    assert means[100][0] < means[100][1] - 0.5
    # S = 1 is one ELBO sample, and the S-sample ELBO does not depend on S in expectation.
    assert abs(means[1][0] - means[1][1]) < 1e-4
    assert abs(means[100][1] - means[10][1]) < 1.0


def test_chunking_does_not_change_the_estimate():
    """Chunk sizes 12, 5 (does not divide S = 12) and 20 (> S) on the same noise give the NLL
    and -ELBO of the S log-weights computed one sample at a time: -(logsumexp - log S) and
    minus their mean. Rows are ordered (sample, image)."""
    torch.manual_seed(0)
    model = CNFVAE((1, 8, 8), "bernoulli", solver=SolverConfig(atol=1e-9, rtol=1e-9),
                   **TINY).eval()
    x = digits_batch(4)
    S, B = 12, x.shape[0]
    noise = torch.randn(S, B, model.z_dim, generator=torch.Generator().manual_seed(3))
    log_weights = model.log_weights

    with torch.no_grad():
        mu, log_sigma, h = model.encode(x)
        w = torch.stack([log_px - kl for log_px, kl in
                         (log_weights(x, mu, log_sigma, h, eps=noise[s]) for s in range(S))])
    expected_nll = -(torch.logsumexp(w, dim=0) - math.log(S))
    expected_neg_elbo = -w.mean(dim=0)
    assert (expected_neg_elbo - expected_nll).min() > 1e-3  # Jensen gap: the two differ

    for chunk in (12, 5, 20):
        used = []

        def fixed_noise(x_, mu_, log_sigma_, h_, eps=None, _used=used):
            # The s samples of this chunk take the next s rows of the noise table.
            assert eps is None and x_.shape[0] % B == 0
            s = x_.shape[0] // B
            start = sum(_used)
            _used.append(s)
            eps = noise[start:start + s].reshape(s * B, model.z_dim)
            return log_weights(x_, mu_, log_sigma_, h_, eps=eps)

        model.log_weights = fixed_noise
        nll, neg_elbo = model.importance_nll(x, S, chunk=chunk)
        assert used == [min(chunk, S - i) for i in range(0, S, chunk)]
        torch.testing.assert_close(nll, expected_nll, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(neg_elbo, expected_neg_elbo, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape,likelihood,arch", [
    ((1, 28, 28), "bernoulli", "conv"),
    ((1, 28, 20), "categorical256", "conv"),
    ((1, 8, 8), "bernoulli", "mlp"),
    ((1, 8, 8), "categorical256", "mlp"),
])
def test_shapes(shape, likelihood, arch):
    torch.manual_seed(0)
    model = CNFVAE(shape, likelihood, solver=LOOSE, **TINY)
    assert model.architecture == arch
    D = math.prod(shape)
    x = torch.rand(3, D)
    if likelihood == "bernoulli":
        x = x.round()
    mu, log_sigma, h = model.encode(x)
    assert mu.shape == log_sigma.shape == (3, 4) and h.shape == (3, 16)
    logits = model.decode(mu)
    assert logits.shape == ((3, D) if likelihood == "bernoulli" else (3, D, 256))
    log_px, kl = model.elbo_terms(x)
    assert log_px.shape == kl.shape == (3,)
    assert (log_px < 0).all()
    assert model.sample(2).shape == (2, D)
    with pytest.raises(ValueError, match="expected flattened images"):
        model.encode(torch.zeros(3, D + 1))


def test_categorical_likelihood_normalises_and_rounds_levels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 256) * 3
    total = torch.zeros(2, 5)
    for k in range(256):
        x = torch.full((2, 5), k / 255.0)
        total += categorical256_log_prob(logits, x).exp()
    torch.testing.assert_close(total, torch.ones(2, 5))
    # level k is read back exactly from the float32 grey value k / 255
    x = (torch.arange(256, dtype=torch.float32) / 255).reshape(1, 256)
    lp = categorical256_log_prob(torch.eye(256).unsqueeze(0) * 50, x)
    assert (lp > -1e-10).all()
    # Bernoulli: p(0) + p(1) = 1
    z = torch.randn(7)
    s = bernoulli_log_prob(z, torch.zeros(7)).exp() + bernoulli_log_prob(z, torch.ones(7)).exp()
    torch.testing.assert_close(s, torch.ones(7))


def test_categorical_model_reports_bits_per_dim():
    torch.manual_seed(0)
    model = CNFVAE((1, 8, 8), "categorical256", solver=LOOSE, is_samples=3, is_chunk=3, **TINY)
    x = torch.rand(10, 64)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=5)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    out = trainer.test(model, dataloaders=dl, verbose=False)[0]
    assert out["test/is_nll"] <= out["test/neg_elbo"] + 1e-4
    assert out["test/nll"] == out["test/is_nll"]
    np.testing.assert_allclose(out["test/bits_per_dim"], out["test/is_nll"] / (64 * math.log(2)),
                               rtol=1e-5)
    # an untrained decoder is near uniform: about 8 bits per pixel
    assert 7 < out["test/neg_elbo_bits_per_dim"] < 9


# ---------------------------------------------------------------------------- amortized net
def test_low_rank_linear_equals_the_explicit_per_sample_matrix():
    torch.manual_seed(0)
    B, n_in, n_out, r = 3, 5, 4, 2
    u, W, a = torch.randn(B, n_in), torch.randn(n_out, n_in), torch.randn(n_out)
    U, V, c = torch.randn(B, n_out, r), torch.randn(B, n_in, r), torch.randn(B, n_out)
    explicit = torch.stack([(W + U[b] @ V[b].T) @ u[b] + a + c[b] for b in range(B)])
    torch.testing.assert_close(low_rank_linear(u, W, a, U, V, c), explicit)


def test_amortized_weights_differ_across_samples():
    torch.manual_seed(0)
    net = AmortizedODENet(4, (8, 8), rank=2)
    head = net.make_head(16)
    context = head(torch.randn(2, 16))
    assert context.shape == (2, net.context_size)
    for U, V, c, _scale, _grads in net.unpack(context):
        assert not torch.allclose(U[0], U[1]) and not torch.allclose(V[0], V[1])
        assert not torch.allclose(c[0], c[1])
    z = torch.randn(1, 4).expand(2, 4)  # same state, different data points
    f = net(torch.tensor(0.3), z, context)
    assert not torch.allclose(f[0], f[1])
    # each sample's field depends on its own context only
    f0 = net(torch.tensor(0.3), z[:1], context[:1])
    torch.testing.assert_close(f[:1], f0)


def test_amortized_net_rejects_bad_context_and_options():
    net = AmortizedODENet(4, (8,), rank=2)
    with pytest.raises(ValueError, match="context must have shape"):
        net(torch.tensor(0.0), torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        AmortizedODENet(4, (8,), rank=0)
    with pytest.raises(ValueError, match="unknown posterior"):
        FlowPosterior("sylvester", 4, 16)


@pytest.mark.parametrize("posterior", ["amortized", "cnf"])
def test_adjoint_gradients_equal_direct_backprop_and_reach_the_encoder(posterior):
    tight = dict(atol=1e-10, rtol=1e-10, eval_atol=1e-10, eval_rtol=1e-10)
    x = digits_batch(5).double()
    eps = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def grads(adjoint):
        torch.manual_seed(4)
        model = CNFVAE((1, 8, 8), "bernoulli", posterior=posterior, z_dim=3, hidden_dims=[8],
                       rank=2, feature_dim=8, mlp_hidden=16, num_blocks=2, trace="exact",
                       solver=SolverConfig(backprop="adjoint" if adjoint else "direct",
                                           **tight)).double()
        with torch.no_grad():  # larger dynamics than at initialisation, for a real test
            for p in model.flow.parameters():
                p.mul_(3)
        with TrajectoryRecorder(2, 1) as recorder:
            log_px, kl = model.elbo_terms(x, eps)
        assert len(recorder.penalties) == len(model.flow.blocks)
        penalty = recorder.penalty()
        ((kl - log_px).mean() + 5 * penalty).backward()
        return {n: p.grad for n, p in model.named_parameters()}

    direct, adjoint = grads(False), grads(True)
    for name in direct:
        torch.testing.assert_close(adjoint[name], direct[name], rtol=1e-6, atol=1e-8,
                                   msg=name)
    if posterior == "amortized":
        # the heads get gradient only through the per-sample context
        assert all(adjoint[n].abs().sum() > 0 for n in adjoint if n.startswith("flow.heads"))
    assert all(adjoint[n].abs().sum() > 0 for n in adjoint if n.startswith("encoder"))


# ---------------------------------------------------------------------------- Lightning
def test_kl_warmup_schedule():
    assert kl_warmup(0, 0, 10, 5) == 0.0
    assert kl_warmup(1, 5, 10, 5) == pytest.approx(0.3)
    assert kl_warmup(7, 0, 10, 5) == 1.0
    assert kl_warmup(3, 2, 10, 0) == 1.0
    assert kl_warmup(2, 4, float("inf"), 4) == 0.5


class Record(L.Callback):
    def __init__(self):
        self.rows = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.backprop = loss.detach().clone()  # listed after the regularizer: the total

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        m = trainer.callback_metrics
        self.rows.append(dict(backprop=self.backprop,
                              loss=m["train/loss"].clone(),
                              neg_elbo=float(m["train/neg_elbo"]),
                              poly=m["reg/poly"].clone(), beta=float(m["train/beta"])))


def test_polynomial_regularizer_works_unchanged_on_the_vae():
    L.seed_everything(0)
    model = tiny(warmup_epochs=0)
    rec = Record()
    reg = PolynomialTrajectoryRegularizer(coef=5.0)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, callbacks=[reg, NFEMonitor(), rec],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, DigitsDataModule(batch_size=50))
    assert len(rec.rows) == 3 and reg.steps == 3
    for row in rec.rows:
        assert row["poly"] > 0 and row["beta"] == 1.0
        assert float(row["loss"]) == pytest.approx(row["neg_elbo"], rel=1e-6)
        # the very float32 operation the callback performs: loss + coef * penalty
        assert torch.equal(row["backprop"], row["loss"] + 5.0 * row["poly"])


def test_fit_validate_test_and_warmup_from_trainer_state():
    L.seed_everything(0)
    model = tiny(warmup_epochs=2, val_is_samples=4, is_samples=8, is_chunk=4)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=3,
                        limit_val_batches=1, limit_test_batches=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DigitsDataModule(batch_size=50))
    m = trainer.callback_metrics
    # last step of 3 in epoch 0 over a 2-epoch warm-up: beta = (0 + 2/3) / 2
    assert float(m["train/beta"]) == pytest.approx(1 / 3)
    assert float(m["val/nll"]) <= float(m["val/neg_elbo"]) + 1e-4
    out = trainer.test(model, DigitsDataModule(batch_size=50), verbose=False)[0]
    assert out["test/is_nll"] <= out["test/neg_elbo"] + 1e-4
    assert "test/bits_per_dim" not in out
    # hyperparameters are plain values that rebuild the same model
    clone = CNFVAE(**model.hparams)
    clone.load_state_dict(model.state_dict())


class SaveWeights(L.Callback):
    def __init__(self, out):
        self.out = str(out)

    def on_fit_end(self, trainer, pl_module):
        state = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        steps = [c.steps for c in trainer.callbacks
                 if isinstance(c, PolynomialTrajectoryRegularizer)]
        torch.save({"state": state, "reg_steps": steps},
                   os.path.join(self.out, f"rank{trainer.global_rank}.pt"))


def test_ddp_spawn_two_processes_keep_identical_weights(tmp_path):
    L.seed_everything(0)
    model = tiny(warmup_epochs=1)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=3,
                        callbacks=[PolynomialTrajectoryRegularizer(), NFEMonitor(),
                                   SaveWeights(tmp_path)],
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    # A plain DataLoader over the digits: the DataModule and its loader hold torch.Generators,
    # which ddp_spawn cannot send to its processes (torch fails to share their state tensor).
    dm = DigitsDataModule(batch_size=50)
    dm.setup("fit")
    data = torch.utils.data.TensorDataset(torch.from_numpy(dm.arrays()["train"]))
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader(data, batch_size=50))
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert r0["reg_steps"] == r1["reg_steps"] == [3]
    w0, w1 = r0["state"], r1["state"]
    assert w0.keys() == w1.keys()
    for key in w0:
        torch.testing.assert_close(w0[key], w1[key], rtol=0, atol=0, msg=key)
    for part in ("flow.blocks", "flow.heads", "encoder", "decoder"):
        assert any(k.startswith(part) and not torch.equal(w0[k], init[k]) for k in w0), part


# ---------------------------------------------------------------------------- factory
def _from_preset(name, shape, likelihood, **options):
    """The model ``train.py --model vae --data NAME`` builds, for images of ``shape``."""
    config = resolve({"model": "vae", "data": name, **options})
    return make_model(config, SimpleNamespace(image_shape=shape, likelihood=likelihood))


def test_presets_hold_the_published_settings():
    table = {"mnist": (64, (1024, 1024), 2, "softplus"),
             "static_mnist": (64, (1024, 1024), 2, "softplus"),
             "omniglot": (20, (512, 512), 5, "softplus"),
             "freyfaces": (20, (512, 512), 2, "softplus"),
             "caltech": (20, (2048,), 1, "tanh")}
    for name, (rank, dims, blocks, act) in table.items():
        c = resolve({"model": "vae", "data": name})
        assert (c.vae.rank, c.flow.hidden_dims, c.flow.num_blocks, c.flow.nonlinearity) == \
            (rank, dims, blocks, act), name
        assert (c.vae.z_dim, c.flow.T, c.training.lr, c.training.batch_size,
                c.vae.warmup_epochs, c.vae.feature_dim) == (64, 0.5, 5e-4, 100, 100, 256), name
        assert (c.ode.atol, c.ode.eval_atol) == (1e-4, 1e-5)
    model = _from_preset("digits", (1, 8, 8), "bernoulli")
    assert model.hparams["solver"]["atol"] == 1e-4
    assert model.hparams["solver"]["eval_atol"] == 1e-5
    assert isinstance(model.configure_optimizers(), torch.optim.Adamax)


@pytest.mark.slow
@pytest.mark.parametrize("name,shape,likelihood", [
    ("mnist", (1, 28, 28), "bernoulli"), ("omniglot", (1, 28, 28), "bernoulli"),
    ("freyfaces", (1, 28, 20), "categorical256"), ("caltech", (1, 28, 28), "bernoulli")])
def test_published_presets_build_and_run(name, shape, likelihood):
    model = _from_preset(name, shape, likelihood)
    x = torch.rand(2, math.prod(shape)).round()
    log_px, kl = model.elbo_terms(x)
    assert log_px.shape == kl.shape == (2,)
    assert torch.isfinite(log_px).all() and torch.isfinite(kl).all()
    # log-probabilities of binary or 8-bit images are negative; one sample of the KL part
    # is not sign-definite, but the decoder's mean image is a probability
    assert (log_px < 0).all()
    mean_image = model.sample(1)
    assert mean_image.shape == (1, math.prod(shape))
    assert ((mean_image >= 0) & (mean_image <= 1)).all()


def test_cnfvae_rejects_bad_options():
    with pytest.raises(TypeError, match="CNFVAE got unexpected keyword arguments \\['zdim'\\]"):
        CNFVAE((1, 8, 8), "bernoulli", zdim=3)
    with pytest.raises(TypeError, match="flow must be a FlowConfig, got tuple"):
        CNFVAE((1, 8, 8), "bernoulli", 4, "amortized", (64, 64))  # 0.2's positional widths
    with pytest.raises(ValueError, match="unknown likelihood 'gaussian'"):
        CNFVAE((1, 8, 8), "gaussian")
    with pytest.raises(ValueError, match="unknown posterior"):
        tiny("iaf")
    with pytest.raises(ValueError, match="image_shape must be three"):
        CNFVAE((8, 8), "bernoulli")
    with pytest.raises(ValueError, match="multiples of 4"):
        CNFVAE((1, 30, 30), "bernoulli", architecture="conv", **TINY)
    with pytest.raises(ValueError, match="is_chunk must be a positive int"):
        tiny(is_chunk=0)
    with pytest.raises(ValueError, match="lr must be"):
        tiny(lr=0.0)


def test_importance_nll_runs_under_inference_mode_without_building_graphs():
    torch.manual_seed(0)
    model = tiny().eval()
    x = digits_batch(4)
    with torch.inference_mode():
        nll, neg_elbo = model.importance_nll(x, 3)
    assert not nll.requires_grad and (nll <= neg_elbo + 1e-4).all()
    assert model.flow.blocks[0].nfe.backward == 0
