"""Checkpoints that load without unpickling: weights in safetensors, the rest as plain tensors.

accelerate's ``save_state``/``load_state`` unpickle RNG and custom state (``weights_only=False``),
so mmdiff writes its own: each model as ``<name>.safetensors``, and optimizer, LR scheduler,
counters and RNG states in ``state.pt``, read back with ``torch.load(weights_only=True)``.
A checkpoint is written to a temporary folder and renamed into place, so an interrupted write
never leaves a half checkpoint behind ``--resume latest``; the temporary folders a killed run
leaves are removed when a run starts in that folder. A checkpoint that cannot be read (corrupt,
truncated, or a ``state.pt`` that is not tensors-only) raises :class:`CheckpointError`, and
``--resume latest`` falls back to the newest one that can.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_dir

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
#: what ``atomic_dir`` names a checkpoint while it is written
TEMPORARY_PATTERN = re.compile(r"^\.checkpoint-\d+\.")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from, with the file and what to do."""


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values (``weights_only``-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_tensor(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    random.setstate(_python_state_from_tensor(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_tensor(state) -> dict:
    version, internal, gauss = state
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss if gauss is not None else float("nan")}


def _python_state_from_tensor(state: dict):
    gauss = state["gauss"]
    return (state["version"], tuple(int(v) for v in state["internal"].tolist()),
            None if gauss != gauss else gauss)


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    weights: dict[str, dict[str, torch.Tensor]],
    state: dict,
    keep: int | None = None,
) -> Path:
    """Write ``run_dir/checkpoint-<step>/`` atomically; with ``keep``, delete all but the newest ``keep``.

    ``weights`` maps a model name to its full state dict (``accelerator.get_state_dict``).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step}"
    with atomic_dir(final) as tmp:
        for name, state_dict in weights.items():
            tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
            save_file(tensors, tmp / f"{name}.safetensors")
        torch.save({**state, "step": step}, tmp / "state.pt")
        (tmp / "checkpoint.json").write_text(json.dumps({"step": step, "models": sorted(weights)}) + "\n")
    if keep is not None:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))
             and (p / "checkpoint.json").exists()]
    return [p for _, p in sorted(found)]


def clean_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Remove the half-written checkpoint folders a killed run left in ``run_dir``; returns them.

    Call it only where no other process is writing checkpoints into ``run_dir`` (a run's start)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    stale = [p for p in run_dir.iterdir() if TEMPORARY_PATTERN.match(p.name) and p.is_dir() and not p.is_symlink()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resume_candidates(run_dir: str | os.PathLike, resume: str | None) -> list[Path]:
    """The checkpoints to try, in order: none without ``resume``; for ``latest`` every finished
    checkpoint of ``run_dir``, newest first (the next is the fallback when one cannot be read);
    else the one path given."""
    if not resume:
        return []
    if resume == "latest":
        return list_checkpoints(run_dir)[::-1]
    path = Path(resume)
    if not (path / "checkpoint.json").exists():
        raise FileNotFoundError(f"{path} is not an mmdiff checkpoint (no checkpoint.json)")
    return [path]


def resolve_resume(run_dir: str | os.PathLike, resume: str | None) -> Path | None:
    """``None`` -> no resume; ``latest`` -> newest checkpoint in ``run_dir`` (None if there is none); else a path."""
    found = resume_candidates(run_dir, resume)
    return found[0] if found else None


def load_checkpoint(path: str | os.PathLike, models: dict[str, torch.nn.Module]) -> dict:
    """Load weights into ``models`` (strict) and return the saved state (optimizer, counters, RNG...).

    Raises :class:`CheckpointError` for a missing, corrupt or truncated file; ``state.pt`` is only
    ever read as tensors (``weights_only=True``) and never unpickled.
    """
    path = Path(path)
    for name, model in models.items():
        file = path / f"{name}.safetensors"
        try:
            tensors = load_file(file)
        except FileNotFoundError:
            raise CheckpointError(f"{file} is missing: {path.name} is incomplete") from None
        except Exception as exc:  # safetensors' own error type: bad header, short file
            raise CheckpointError(f"{file} is corrupt or truncated ({exc})") from None
        try:
            model.load_state_dict(tensors)
        except RuntimeError:
            raise CheckpointError(f"{file} does not fit the {name} of this config (another model size?): "
                                  "resume with the config the run was trained with") from None
    state_file = path / "state.pt"
    try:
        state = torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch's message would invite unpickling: say what it means instead
        raise CheckpointError(f"{state_file} is corrupt, truncated or untrusted ({type(exc).__name__}): it "
                              "holds no tensors-only mmdiff state, and mmdiff never unpickles anything") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{state_file} is not an mmdiff training state (no step)")
    return state


def init_weights(source: str | os.PathLike, models: dict[str, torch.nn.Module]) -> dict[str, dict[str, list[str]]]:
    """Start ``models`` from the weights in ``source`` (fine-tuning), matching tensors by name and shape.

    ``source`` is a checkpoint folder (``<name>.safetensors``) or a model or pipeline folder
    (``<name>/diffusion_pytorch_model.safetensors``, e.g. a published pipeline to fine-tune on one's
    own data). Unlike :func:`load_checkpoint` this is not strict: a layer the source lacks or has in
    another shape (a new output layer, a wider dataset embedding) keeps its fresh initialisation,
    and the report says which: per model, ``loaded``, ``fresh`` and ``unused`` (source tensors that
    found no place). A model with no file in ``source`` starts fresh. No optimizer state or step
    counter is taken: this is a new run.
    """
    source = Path(source)
    if not source.is_dir():
        raise CheckpointError(f"--init-from {source}: no such folder (a checkpoint, model or pipeline folder)")
    report: dict[str, dict[str, list[str]]] = {}
    for name, model in models.items():
        candidates = [source / f"{name}.safetensors", source / name / "diffusion_pytorch_model.safetensors"]
        file = next((c for c in candidates if c.is_file()), None)
        own = model.state_dict()
        if file is None:
            report[name] = {"loaded": [], "fresh": sorted(own), "unused": []}
            continue
        try:
            tensors = load_file(file)
        except Exception as exc:
            raise CheckpointError(f"{file} is corrupt or truncated ({exc})") from None
        fits = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in fits.items()}, strict=False)
        report[name] = {"loaded": sorted(fits), "fresh": sorted(set(own) - set(fits)),
                        "unused": sorted(set(tensors) - set(fits))}
    if not any(r["loaded"] for r in report.values()):
        raise CheckpointError(f"--init-from {source}: no weights there fit this config's "
                              f"{', '.join(models)} (another model?)")
    return report

