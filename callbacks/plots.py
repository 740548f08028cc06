"""Pictures of a 2-D CNF during training: its density and the trajectories of its samples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from polyreg_cnf.engine._checks import check_int, check_number, check_optional_int
from polyreg_cnf.engine.cnf import CNF
from polyreg_cnf.engine.ode import ode_blocks
from polyreg_cnf.engine.solving import solve

__all__ = ["TrajectoryPlotter", "density_grid", "sample_trajectories"]


def density_grid(pl_module: L.LightningModule, bounds: float, grid_size: int,
                 chunk: int = 4096) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Model density :math:`p(x) = \\exp \\log p(x)` on a square grid of 2-D points.

    Calls ``pl_module.log_prob`` in chunks; the caller chooses the mode (eval for the evaluation
    tolerances and exact trace).

    Args:
        pl_module: A module with ``log_prob(x) -> (B,)`` for x of shape (B, 2).
        bounds: The grid spans ``[-bounds, bounds]`` on both axes.
        grid_size: Points per axis.
        chunk: Points per ``log_prob`` call (memory bound).

    Returns:
        ``(xs, ys, density)``, the axis coordinates (grid_size,) and the density
        (grid_size, grid_size) indexed ``[y, x]``.
    """
    xs = np.linspace(-bounds, bounds, grid_size, dtype=np.float64)
    gx, gy = np.meshgrid(xs, xs)
    points = np.stack([gx.ravel(), gy.ravel()], axis=1)
    param = next(pl_module.parameters())
    x = torch.as_tensor(points, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        logp = torch.cat([pl_module.log_prob(part) for part in x.split(chunk)])
    density = logp.exp().reshape(grid_size, grid_size).cpu().numpy()
    return xs, xs, np.nan_to_num(density, nan=0.0, posinf=0.0)


def sample_trajectories(blocks: list[CNF], num_points: int, num_times: int,
                        generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Paths of base samples pushed backwards through the flow (the sampling direction).

    Each block's vector field ``net(t, z)`` is integrated from its end time T down to 0 with
    the engine's :func:`~polyreg_cnf.engine.solving.solve`, saving ``num_times`` evenly spaced
    states; the log-density is not needed for a path, so the cheaper plain ODE is solved. The
    blocks' own NFE counters are left alone; an observer active around the call (e.g.
    :func:`polyreg_cnf.record_nfe`) counts these solves. Blocks run last-to-first, as
    ``CNFStack(reverse=True)`` does.

    Args:
        blocks: The CNF blocks, in the flow's (data-to-base) order; their nets take ``(t, z)``.
        num_points: Base samples z ~ N(0, I).
        num_times: Saved states per block (>= 2).
        generator: Random generator of the base samples (fixed seed: comparable frames).

    Returns:
        ``(times, paths)``: flow time running from the total end time down to 0, shape (S,),
        and the states, shape (S, num_points, D), where S = len(blocks) * (num_times - 1) + 1.

    Example:
        >>> from polyreg_cnf import CNF, ODENet
        >>> blocks = [CNF(ODENet(2, (8,)), T=0.5), CNF(ODENet(2, (8,)), T=1.0)]
        >>> times, paths = sample_trajectories(blocks, num_points=10, num_times=5)
        >>> times
        tensor([1.5000, 1.2500, 1.0000, 0.7500, 0.5000, 0.3750, 0.2500, 0.1250, 0.0000])
        >>> paths.shape
        torch.Size([9, 10, 2])
    """
    first = blocks[-1]
    param = next(first.net.parameters())
    dim = _block_dim(first)
    z = torch.randn(num_points, dim, generator=generator).to(param.device, param.dtype)
    offsets = np.cumsum([0.0] + [b.end_time_tensor(z).item() for b in blocks])
    times: list[Tensor] = []
    paths: list[Tensor] = [z[None]]
    with torch.no_grad():
        for index in range(len(blocks) - 1, -1, -1):
            block = blocks[index]
            end = block.end_time_tensor(z)
            t = torch.linspace(1.0, 0.0, num_times, dtype=z.dtype, device=z.device) * end
            atol, rtol = block.solver.tolerances(False)
            # The evaluation solver (method and grid too), as the reported NLL uses.
            traj = solve(block.net, z, t, rtol=rtol, atol=atol,
                         method=block.solver.method_for(False),
                         options=block.solver.options(False))
            paths.append(traj[1:])
            times.append(t[1:] + float(offsets[index]))
            z = traj[-1]
    start = torch.tensor([float(offsets[-1])], dtype=z.dtype, device=z.device)
    return torch.cat([start, *times]).cpu(), torch.cat(paths).cpu()


def _block_dim(block: CNF) -> int:
    """Data dimension of a block, from its net (``dim`` attribute or first layer's input)."""
    dim = getattr(block.net, "dim", None)
    if isinstance(dim, int):
        return dim
    raise ValueError(f"cannot tell the data dimension of {type(block.net).__name__}: it has no "
                     f"integer `dim` attribute")


class TrajectoryPlotter(L.Callback):
    """Saves pictures of a 2-D CNF every N training steps and when ``fit`` ends.

    Two PNGs per render, in ``out_dir`` (default ``<trainer.default_root_dir>/plots``):

    * ``density_step<NNNNNN>.png``: :math:`p(x)` of the model on a grid, and samples;
    * ``trajectories_step<NNNNNN>.png``: base samples flowing back through every block from
      the base distribution to the data, coloured by flow time (the paper's figure).

    With a WandbLogger among the trainer's loggers, the pictures are also logged as images
    ``plots/density`` and ``plots/trajectories`` at the current global step. Rendering runs on
    rank 0, in eval mode (evaluation tolerances, exact trace) under ``torch.no_grad``, restores
    the training mode afterwards, and puts the blocks' NFE counters back, so the NFE monitor
    sees only the training step. Non-2-D models are skipped with one warning.

    Args:
        every_n_steps: Render every N global steps; ``None`` renders only at the end of fit.
        num_points: Base samples whose paths are drawn.
        num_times: States saved per block along each path.
        grid_size: Density grid points per axis.
        bounds: Plot range ``[-bounds, bounds]`` on both axes (data units the model sees).
        out_dir: Folder of the PNGs; default ``<trainer.default_root_dir>/plots``.
        seed: Seed of the base samples (the same points in every frame).

    Example:
        >>> plotter = TrajectoryPlotter(every_n_steps=200, num_points=50)
        >>> trainer = L.Trainer(callbacks=[plotter], logger=False, enable_progress_bar=False,
        ...                     enable_model_summary=False)
        >>> plotter in trainer.callbacks
        True
    """

    def __init__(self, every_n_steps: int | None = 500, num_points: int = 300,
                 num_times: int = 21, grid_size: int = 100, bounds: float = 4.0,
                 out_dir: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        check_optional_int("every_n_steps", every_n_steps)
        for name, value, low in (("num_points", num_points, 1), ("num_times", num_times, 2),
                                 ("grid_size", grid_size, 2)):
            check_int(name, value, minimum=low)
        check_number("bounds", bounds, strict=True)
        self.every_n_steps = every_n_steps
        self.num_points = num_points
        self.num_times = num_times
        self.grid_size = grid_size
        self.bounds = float(bounds)
        self.out_dir = None if out_dir is None else Path(out_dir)
        self.seed = seed
        self._warned = False
        self._last_step: int | None = None

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps is not None and step > 0 and step % self.every_n_steps == 0:
            self._render_and_log(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._render_and_log(trainer, pl_module)

    # ------------------------------------------------------------------ public
    def render(self, pl_module: L.LightningModule, out_dir: str | Path,
               step: int = 0) -> list[Path]:
        """Draw the density and trajectory pictures of ``pl_module`` now.

        Args:
            pl_module: A 2-D model with CNF blocks (and ``log_prob`` for the density).
            out_dir: Folder for the PNGs (created if missing).
            step: Step number written into the file names and titles.

        Returns:
            The PNG files written; empty when the model is not a 2-D CNF (warned once).
        """
        blocks = [b for b in ode_blocks(pl_module) if isinstance(b, CNF)]
        dim = getattr(pl_module, "dim", None)
        if not blocks or dim != 2:
            self._warn_once(f"TrajectoryPlotter draws 2-D CNFs only; "
                            f"{type(pl_module).__name__} has dim={dim!r} and {len(blocks)} CNF "
                            f"block(s), so no pictures are drawn.")
            return []
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        was_training = pl_module.training
        saved = [b.nfe.as_dict() for b in ode_blocks(pl_module)]
        pl_module.eval()
        try:
            generator = torch.Generator().manual_seed(self.seed)
            times, paths = sample_trajectories(blocks, self.num_points, self.num_times,
                                               generator)
            files = []
            if callable(getattr(pl_module, "log_prob", None)):
                xs, ys, density = density_grid(pl_module, self.bounds, self.grid_size)
                files.append(self._draw_density(out / f"density_step{step:06d}.png", xs, ys,
                                                density, paths[-1].numpy(), step))
            files.append(self._draw_trajectories(out / f"trajectories_step{step:06d}.png",
                                                 times.numpy(), paths.numpy(), step))
        finally:
            pl_module.train(was_training)
            for block, counts in zip(ode_blocks(pl_module), saved):
                for key, value in counts.items():
                    setattr(block.nfe, key, value)
        return files

    # ------------------------------------------------------------------ internals
    def _render_and_log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step == self._last_step:
            return
        self._last_step = step
        out_dir = self.out_dir or Path(trainer.default_root_dir) / "plots"
        files = self.render(pl_module, out_dir, step)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                for path in files:
                    key = "plots/" + path.stem.split("_step")[0]
                    logger.log_image(key=key, images=[str(path)], step=step)

    def _warn_once(self, message: str) -> None:
        if not self._warned:
            rank_zero_warn(message)
            self._warned = True

    def _figure(self) -> tuple[Any, Any]:
        # The object-oriented API with an explicit Agg canvas: no pyplot global state, no GUI
        # backend, safe from a training loop.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4.2, 4.2), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.set_xlim(-self.bounds, self.bounds)
        ax.set_ylim(-self.bounds, self.bounds)
        ax.set_aspect("equal")
        return fig, ax

    def _draw_density(self, path: Path, xs: np.ndarray, ys: np.ndarray, density: np.ndarray,
                      samples: np.ndarray, step: int) -> Path:
        fig, ax = self._figure()
        ax.pcolormesh(xs, ys, density, cmap="magma", shading="auto")
        ax.scatter(samples[:, 0], samples[:, 1], s=2, c="white", alpha=0.5, linewidths=0)
        ax.set_title(f"model density p(x), step {step}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        fig.tight_layout()
        fig.savefig(path)
        return path

    def _draw_trajectories(self, path: Path, times: np.ndarray, paths: np.ndarray,
                           step: int) -> Path:
        from matplotlib.collections import LineCollection

        fig, ax = self._figure()
        # One segment per (point, interval), coloured by the flow time at its start.
        segments = np.stack([paths[:-1], paths[1:]], axis=2)  # (S-1, N, 2, D)
        colours = np.repeat(times[:-1], paths.shape[1])
        lines = LineCollection(segments.reshape(-1, 2, paths.shape[2]), cmap="viridis",
                               linewidths=0.6, alpha=0.7)
        lines.set_array(colours)
        lines.set_clim(times.min(), times.max())
        ax.add_collection(lines)
        ax.scatter(paths[0, :, 0], paths[0, :, 1], s=3, c="black", label=f"base (t={times[0]:g})")
        ax.scatter(paths[-1, :, 0], paths[-1, :, 1], s=3, c="tab:red", label="sample (t=0)")
        ax.legend(loc="upper right", fontsize=7, markerscale=2)
        fig.colorbar(lines, ax=ax, fraction=0.046, pad=0.02, label="flow time t")
        ax.set_title(f"sample trajectories, step {step}", fontsize=10)
        fig.tight_layout()
        fig.savefig(path)
        return path
