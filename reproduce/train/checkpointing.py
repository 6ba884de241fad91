"""What a training run leaves in its folder, and the one loader that reads it back.

- ``checkpoint.pt``: the full resumable state (model, optimizer, scaler, step, identity); the
  persistent, non-cached output a preempted run resumes from.
- ``model.safetensors``: the weights only, with the run's description in the header metadata; the
  small file a pipeline caches and a fine-tune or evaluation starts from.
- ``best.pt``: the checkpoint of the best periodic evaluation (``--eval-every``).

Every write goes through a temporary file in the same folder and a rename, so a reader (or a run
killed half-way) never sees half a file.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from models.weights import load_torch_file, read_checkpoint
from reproduce.params import BEST_NAME, CHECKPOINT_FORMAT, CHECKPOINT_NAME, WEIGHTS_FORMAT, WEIGHTS_NAME

# The description a weights file carries (everything but the tensors and the training state).
WEIGHTS_META_KEYS = (
    "task", "model", "model_settings", "num_classes", "class_names", "profile", "dataset", "data_source",
    "recipe", "step", "total_steps", "finished",
)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary file in the same folder, then rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # some writers create private files; results are shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_weights(path: Path, state: dict[str, Any]) -> None:
    """``state["model_state"]`` as safetensors, with ``WEIGHTS_META_KEYS`` of ``state`` as JSON metadata.
    Tensors are copied to contiguous CPU storage (safetensors refuses shared or strided memory)."""
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in state["model_state"].items()}
    meta = {k: state.get(k) for k in WEIGHTS_META_KEYS}
    metadata = {"format": WEIGHTS_FORMAT, "meta": json.dumps(meta, sort_keys=True, default=str)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def write_metrics(path: Path, metrics: dict[str, Any]) -> None:
    text = json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _missing(path: Path) -> FileNotFoundError:
    """A missing run file; a finished run whose ``checkpoint.pt`` is gone (the pipeline deletes it)
    still has its ``model.safetensors``, which the message names."""
    weights = path.with_name(WEIGHTS_NAME)
    if path.suffix != ".safetensors" and weights.is_file():
        return FileNotFoundError(f"{path} does not exist; the run's weights are in {weights} (a finished pipeline "
                                 f"stage keeps only those): pass that file")
    return FileNotFoundError(f"{path} does not exist (expected a run's {CHECKPOINT_NAME}, {BEST_NAME} or {WEIGHTS_NAME})")


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A full ``checkpoint.pt`` / ``best.pt`` written by this suite, read with ``weights_only=True``
    (``models.weights.load_torch_file``: a file that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    state = load_torch_file(path)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by this suite (format {CHECKPOINT_FORMAT!r})")
    return _complete(path, state)


def _complete(path: Path, state: dict[str, Any]) -> dict[str, Any]:
    """``state`` if it has every key a run file of this suite is written with, else a ValueError naming the
    missing ones (a file in the suite's format that was damaged or edited by hand)."""
    missing = [k for k in (*WEIGHTS_META_KEYS, "model_state") if k not in state]
    if not missing and not isinstance(state["model_state"], dict):
        missing = ["model_state (a dict of tensors)"]
    if missing:
        raise ValueError(f"{path} is in this suite's format but lacks {', '.join(missing)} (damaged or edited by hand)")
    return state


def load_weights(path: Path) -> dict[str, Any]:
    """A ``model.safetensors`` of this suite as the checkpoint dict shape (no optimizer state)."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path)
    state = read_checkpoint(path)
    if state["format"] != WEIGHTS_FORMAT:
        raise ValueError(f"{path} is not a weights file written by this suite (format {WEIGHTS_FORMAT!r})")
    return _complete(path, state)


def load_run_state(path: Path) -> dict[str, Any]:
    """``checkpoint.pt``, ``best.pt`` or ``model.safetensors`` of a run, as one dict shape: format,
    task, model, model_settings, num_classes, class_names, profile, dataset, data_source, recipe,
    step, total_steps, finished and model_state (checkpoints add the optimizer/scaler state)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_weights(path)
    return load_checkpoint(path)


def run_fingerprint(identity: dict[str, Any]) -> str:
    """Short hash of a run's identity (the settings that determine its numbers)."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Every setting that differs between two run identities, as ``name: old -> new``."""
    missing = object()
    return [
        f"{key}: {old.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"
        for key in sorted(set(old) | set(new))
        if old.get(key, missing) != new.get(key, missing)
    ]
