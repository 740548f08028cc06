"""Checkpoints that are written atomically and refuse to load into the wrong kind of model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from polyreg_cnf.engine.errors import PolyregCNFError

__all__ = ["AtomicCheckpointIO", "CheckpointKindError", "check_checkpoint_kind",
           "stamp_checkpoint_kind"]

KIND_KEY = "polyreg_cnf"


class CheckpointKindError(PolyregCNFError, ValueError):
    """A checkpoint was written by another kind of model (or not by polyreg-cnf at all)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint with one ``torch.save`` to a temporary file beside it, flushed to
    disk, then renamed into place with :func:`os.replace`.

    A rename within one folder is atomic, so a reader (a resumed run, another process) sees the
    previous complete checkpoint or the new complete one, never a half-written file, even if the
    writer is killed mid-write. Lightning's own save (``TorchCheckpointIO``, 2.6) is not that:
    it stages the file in the system temporary folder and moves it, which is a copy into the
    destination whenever that folder is on another file system (often: /tmp is a RAM disk).
    Reading and removing checkpoints are Lightning's.

    Example:
        >>> import tempfile, torch
        >>> folder = tempfile.mkdtemp()
        >>> AtomicCheckpointIO().save_checkpoint({"step": torch.tensor(3)}, f"{folder}/a.ckpt")
        >>> sorted(os.listdir(folder)), torch.load(f"{folder}/a.ckpt")["step"].item()
        (['a.ckpt'], 3)
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike,
                        storage_options: Any | None = None) -> None:
        """Save ``checkpoint`` to ``path`` atomically (``storage_options`` must be None)."""
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got "
                            f"{storage_options!r}")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
        try:
            with open(tmp, "wb") as handle:
                torch.save(checkpoint, handle)
                handle.flush()
                os.fsync(handle.fileno())  # the bytes are on disk before the name points at them
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()


def stamp_checkpoint_kind(checkpoint: dict[str, Any], kind: str, **facts: Any) -> None:
    """Record which model wrote the checkpoint (called from ``on_save_checkpoint``)."""
    checkpoint[KIND_KEY] = {"model": kind, **facts}


def check_checkpoint_kind(checkpoint: dict[str, Any], kind: str, **facts: Any) -> None:
    """Raise CheckpointKindError unless the checkpoint was written by ``kind`` with ``facts``.

    Called from ``on_load_checkpoint``, before any weight is touched, so the user gets one clear
    sentence instead of a wall of missing and unexpected state-dict keys.
    """
    stamp = checkpoint.get(KIND_KEY)
    if not isinstance(stamp, dict):
        raise CheckpointKindError(
            f"this checkpoint was not written by polyreg-cnf (no '{KIND_KEY}' entry); it cannot "
            f"be loaded into a {kind} model")
    if stamp.get("model") != kind:
        raise CheckpointKindError(
            f"this checkpoint holds a {stamp.get('model')!r} model, but the run builds a {kind!r} "
            f"model: pass the matching --model, or a checkpoint of this kind")
    for key, value in facts.items():
        if key in stamp and stamp[key] != value:
            raise CheckpointKindError(
                f"this {kind} checkpoint has {key}={stamp[key]!r}, but the run builds "
                f"{key}={value!r}: use the same data set and network as the run that wrote it")
