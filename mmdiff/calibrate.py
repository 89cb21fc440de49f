"""``mmdiff calibrate``: refit a diffusion pipeline's point-estimate weight and uncertainty scale.

A diffusion pipeline stores what :func:`mmdiff.pipelines.ldm.calibrate` fits on validation slices:
``residual_fit`` (how much of the UNet's residual the point estimate of K runs adds to its
predictor's image) and ``interval_scale`` (so that ``image +- uncertainty`` covers ``coverage`` of brain voxels;
``interval_scales``: one per target sequence, and with ``--groups`` per finer group -- a target on one
dataset, from one source -- with enough validation voxels). Training
fits them on its own validation split at export; this command refits them on the validation cases of
any prepared cache -- another site's data, more slices, another ``coverage`` -- and writes a new
pipeline folder (the input folder is never changed). What it fitted, on how many voxels, and the
predictor's and the point estimate's error there go to ``calibration.json`` in the new folder; the
model card is left behind (its numbers were the old pipeline's): evaluate the new folder and
``mmdiff export`` it to write one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .io import atomic_dir, write_json


def calibrate_pipeline(pipe, cache: Path, out: Path, num_samples: int | None = None,
                       num_inference_steps: int | None = None,
                       coverage: float | None = None, slices_per_case: int = 4, cases_per_dataset: int = 4,
                       seed: int = 1, fit_weight: bool = True, overwrite: bool = False,
                       uncertainty_window: int | None = None, conditions: str | None = None,
                       groups: bool = False) -> dict:
    """Fit ``residual_fit`` and ``interval_scale`` of ``pipe`` (an :class:`~mmdiff.pipelines.MMDiffPipeline`)
    on ``cache``'s validation cases (test cases where it has none) and save the pipeline to ``out``.

    The interval scale holds for the sample count and steps it is fitted at (by default the pipeline's
    own defaults, the settings a user gets) and for the spread's pooling window
    (``uncertainty_window``, stored with it; default :data:`~mmdiff.pipelines.ldm.DEFAULT_UNCERTAINTY_WINDOW`).
    ``conditions``: the sources and targets each validation slice gets (default:
    :data:`~mmdiff.training.data.CALIBRATION_CONDITIONS`; see :func:`~mmdiff.training.data.calibration_slices`)."""
    from .data.cache import cache_preprocessor, read_index
    from .data.preprocessing import MRIPreprocessor
    from .pipelines.common import diffusion_settings
    from .pipelines.ldm import DEFAULT_UNCERTAINTY_WINDOW, calibrate
    from .training.data import CALIBRATION_CONDITIONS, calibration_slices, validation_samples

    if getattr(pipe, "engine", None) != "ldm":
        raise ValueError("calibrate: only a diffusion (ldm) pipeline has a residual weight and an uncertainty scale")
    uncertainty_window = DEFAULT_UNCERTAINTY_WINDOW if uncertainty_window is None else int(uncertainty_window)
    if uncertainty_window < 1:
        raise ValueError(f"--uncertainty-window must be at least 1 (pixels), got {uncertainty_window}")
    num_inference_steps, num_samples = diffusion_settings(pipe, num_inference_steps, num_samples)
    out = Path(out)
    source = Path(pipe.config.get("_name_or_path") or "")
    if source.is_dir() and out.resolve() == source.resolve():
        raise ValueError(f"{out} is the pipeline being calibrated: write the calibrated pipeline to another folder")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists: choose another folder or pass --overwrite")
    own = pipe.preprocessor or MRIPreprocessor.legacy()
    data = cache_preprocessor(cache)
    if own.describe() != data.describe():  # the rule and its parameter, in words
        raise ValueError(f"the cache was prepared with {data.describe()} but the pipeline was trained with "
                         f"{own.describe()}: calibrate on a cache prepared like its training data")
    modalities = list(pipe.modalities)
    index = read_index(cache)
    if list(index["modalities"]) != modalities:
        raise ValueError(f"the cache's sequences {index['modalities']} differ from the pipeline's {modalities}")
    names = list(pipe.unet.config.dataset_names or [])
    cache_names = list(index["datasets"])
    samples = validation_samples({"modalities": modalities}, Path(cache), slices_per_case, cases_per_dataset,
                                 pipe.context_slices)
    if not samples:
        raise ValueError(f"{cache} has no held-out case with two or more sequences to calibrate on")
    unknown = sorted({cache_names[int(s["dataset_id"])] for s in samples} - set(names))
    conditions = conditions or CALIBRATION_CONDITIONS
    slices = calibration_slices(samples, lambda i: names.index(cache_names[i]) if cache_names[i] in names else -1,
                                conditions=conditions, seed=seed, modalities=modalities)
    coverage = float(pipe.config.coverage if coverage is None else coverage)
    fitted = calibrate(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, num_samples, num_inference_steps,
                       coverage, pipe.config.point_estimate, torch.Generator(device="cpu").manual_seed(seed),
                       fit_weight=fit_weight, uncertainty_window=uncertainty_window,
                       error_model=getattr(pipe, "error_model", None), groups=groups)
    stored = fitted.pipeline_config()
    pipe.register_to_config(**stored, coverage=coverage)
    record = {"residual_weight": {k: fitted.weight(k) for k in (1, 2, 4, 8)}, "residual_fit": stored["residual_fit"],
              "interval_scale": fitted.interval_scale, "interval_scales": fitted.interval_scales,
              "target_voxels": fitted.target_voxels, "group_voxels": fitted.group_voxels, "coverage": coverage,
              "num_samples": num_samples,
              "num_inference_steps": num_inference_steps, "point_estimate": pipe.config.point_estimate,
              "uncertainty_window": uncertainty_window, "error_model": getattr(pipe, "error_model", None) is not None,
              "spearman_calibration": fitted.spearman, "spearman_calibration_samples_only": fitted.spearman_samples,
              "slices": len(slices), "voxels": fitted.voxels, "predictor_mse": fitted.predictor_mse,
              "point_mse": fitted.point_mse, "datasets": sorted({cache_names[int(s["dataset_id"])] for s in samples}),
              "datasets_unknown_to_the_model": unknown, "conditions": conditions, "seed": seed, "groups": groups}
    with atomic_dir(out) as tmp:  # replaces an older ``out`` only once the new one is whole
        pipe.save_pretrained(tmp)
        # the run record travels with the weights (`mmdiff export` renders a card from it and a new
        # evaluation); the old card does not: its numbers are the uncalibrated pipeline's
        if (source / "training_info.json").is_file():
            shutil.copyfile(source / "training_info.json", tmp / "training_info.json")
        write_json(tmp / "calibration.json", record)
    return record
