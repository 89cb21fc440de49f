"""Files in, files out: synthesize the missing sequences of one exam (``mmdiff synthesize``).

Each target becomes ``OUT/<target>_synthetic.nii.gz`` on the inputs' own grid and affine, marked
synthetic in its NIfTI header, with a JSON sidecar recording the model, its revision, the inputs, the
seed and the steps; with several samples, ``OUT/<target>_uncertainty.nii.gz`` holds the per-voxel
standard deviation. Nothing is written over an input, and nothing over an existing file unless
``overwrite``; every output path is checked before the model runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .io import (OverwriteError, SYNTHETIC_DESCRIP, check_not_input, provenance_record, save_nifti, sidecar_path,
                 write_json)
from .modalities import KNOWN_MODALITIES, canonical

def revision(source: str | os.PathLike) -> str:
    """A short content hash of a local pipeline folder's index and weights (or the repo id itself)."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*")):
        if file.suffix in (".json", ".safetensors") and file.is_file():
            digest.update(str(file.relative_to(path)).encode())
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def output_paths(out: Path, targets: list[str], samples: int) -> dict[str, Path]:
    paths = {t: out / f"{t}_synthetic.nii.gz" for t in targets}
    if samples > 1:
        paths |= {f"{t}_uncertainty": out / f"{t}_uncertainty.nii.gz" for t in targets}
    return paths


def synthesize(
    inputs: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    pipeline=None,
    pipeline_source: str | os.PathLike | None = None,
    engine: str | None = None,
    dataset: str | None = None,
    targets: list[str] | None = None,
    steps: int = 20,
    scheduler: str | None = None,
    samples: int = 1,
    seed: int = 0,
    brain_mask: str | os.PathLike | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Synthesize the missing sequences of one exam from NIfTI files; returns the written paths.

    ``pipeline_source`` (a folder or Hub repo id; default: the published pipeline of ``engine``,
    else the LDM) is loaded unless ``pipeline`` is given; the provenance records the engine that ran."""
    if not inputs:
        raise ValueError("no input sequence given: pass at least one of "
                         + " ".join(f"--{m}" for m in KNOWN_MODALITIES))
    inputs = {canonical(k, KNOWN_MODALITIES): Path(v) for k, v in inputs.items()}
    missing = [str(p) for p in inputs.values() if not p.exists()]
    if missing:
        raise FileNotFoundError(f"input file(s) not found: {', '.join(missing)}")
    from .pipelines import load_pipeline, resolve_source

    if pipeline is None:
        source = resolve_source(pipeline_source, engine)
        pipe = load_pipeline(source, engine)  # checks that it is of `engine`, when given
    else:
        source = resolve_source(pipeline_source) if pipeline_source is not None else None
        pipe = pipeline
        if engine is not None and pipe.engine != engine:
            raise ValueError(f"the pipeline is {type(pipe).__name__} (engine {pipe.engine}), not the {engine} engine")
    diffusion = pipe.engine == "ldm"
    if scheduler is not None:
        if not diffusion:
            raise ValueError(f"--scheduler is for the diffusion engine; the {pipe.engine} pipeline has no scheduler")
        from .pipelines import use_scheduler

        use_scheduler(pipe, scheduler)
    modalities = pipe.modalities
    targets = [canonical(t, modalities) for t in targets] if targets else [m for m in modalities if m not in inputs]
    out = Path(out)
    paths = output_paths(out, targets, samples)
    input_files = list(inputs.values()) + ([Path(brain_mask)] if brain_mask else [])
    for path in paths.values():
        check_not_input(path, input_files)
        for file in (path, sidecar_path(path)):
            if file.exists() and not overwrite:
                raise OverwriteError(f"{file} exists (pass --overwrite to replace it)")
    generator = torch.Generator().manual_seed(seed)
    kwargs = {"num_inference_steps": steps, "num_samples": samples, "generator": generator} if diffusion else {}
    result = pipe({m: str(p) for m, p in inputs.items()}, dataset=dataset, targets=targets, output_type="nifti",
                  brain_mask=str(brain_mask) if brain_mask else None, batch_size=batch_size, **kwargs)
    provenance = {
        "model": str(source if source is not None else getattr(pipe, "name_or_path", None) or type(pipe).__name__),
        "model_revision": revision(source) if source is not None else None, "engine": pipe.engine,
        "pipeline": type(pipe).__name__,
        "dataset": dataset, "inputs": {m: str(p.resolve()) for m, p in inputs.items()},
        "brain_mask": str(Path(brain_mask).resolve()) if brain_mask else "derived from the inputs",
        "targets": targets, "seed": seed,
        **({"steps": steps, "samples": samples, "scheduler": type(pipe.scheduler).__name__} if diffusion else {}),
        "intensity_units": "mmdiff normalised [0, 1] (99.5th percentile inside the brain = 1)",
    }
    written = {}
    for name, path in paths.items():
        target, _, kind = name.partition("_")
        image = (result.uncertainty if kind else result.images)[target]
        save_nifti(np.asarray(image.dataobj, dtype=np.float32), image.affine, path, header=image.header,
                   descrip=SYNTHETIC_DESCRIP, overwrite=overwrite, inputs=input_files)
        write_json(sidecar_path(path), provenance_record({**provenance, "target": target,
                                                          "map": "uncertainty (std over samples)" if kind else
                                                          "synthetic image"}),
                   overwrite=True, inputs=input_files)
        written[name] = path
    return written
