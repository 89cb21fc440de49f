"""Training data: the slice cache a config names (built on first use where the config says how),
the MCBS loader, and a fixed validation set."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..data.dataset import SliceDataset
from ..data.layouts import scan
from ..data.manifest import read_manifest
from ..data.prepare import PrepareConfig, prepare
from ..data.sampler import ModalityConsistentBatchSampler
from .config import ConfigError

logger = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]  # relative data sources: from a checkout's root


def cache_path(data_cfg: dict) -> Path:
    return Path(os.path.expandvars(os.path.expanduser(str(data_cfg["cache"]))))


def ensure_cache(data_cfg: dict, is_main_process: bool = True) -> Path:
    """The prepared cache a config names; built from ``data.build`` if it does not exist yet.

    Only the main process builds; callers on several processes wait for it afterwards.
    """
    cache = cache_path(data_cfg)
    if (cache / "index.json").exists():
        return cache
    build = data_cfg.get("build")
    if not build:
        raise ConfigError(
            f"{cache} is not a prepared cache and the config has no data.build section to make one: "
            f"run `mmdiff prepare SOURCES --out {cache}` first, or set data.cache"
        )
    if is_main_process:
        build_cache(cache, {"modalities": data_cfg.get("modalities"), **build})
    return cache


def build_cache(cache: Path, build: dict) -> None:
    """Phantom cohorts (inside ``cache/sources``) plus any listed sources, prepared into ``cache``.

    ``build`` may name the cache's ``modalities`` (default: the data config's) and its intensity rule
    (``normalisation``, ``median_scale``, ``clip_percentile``; default: :class:`PrepareConfig`'s). A
    source may say how its lesion masks are numbered (``mask_labels: binary``; default "brats",
    :data:`mmdiff.data.prepare.MASK_LABELS`).
    """
    from ..data.phantom import write_cohorts

    cases, mask_labels = [], {}
    phantom = build.get("phantom")
    if phantom:
        root = cache / "sources" / "phantoms"
        if not (root / "manifest.csv").exists():
            write_cohorts(root, cases=int(phantom.get("cases", 3)), seed=int(phantom.get("seed", 0)),
                          cohorts=phantom.get("cohorts"), spacing=float(phantom.get("spacing", 1.0)), overwrite=True)
        cases += read_manifest(root / "manifest.csv")
    for source in build.get("sources", []):
        path = Path(os.path.expanduser(str(source["path"])))
        path = path if path.is_absolute() else REPO_ROOT / path
        if not path.exists():
            if source.get("optional", False):
                logger.warning("optional source %s not found at %s: left out", source.get("name"), path)
                continue
            raise ConfigError(f"data source {source.get('name')!r} not found at {path}")
        found = scan(path, dataset=source.get("name"))
        if source.get("mask_labels"):  # how its lesion masks are numbered (mmdiff.data.prepare.MASK_LABELS)
            mask_labels |= {case.dataset: str(source["mask_labels"]) for case in found}
        cases += found
    if not cases:
        raise ConfigError("data.build names no phantom cohorts and no sources")
    intensity = {k: build[k] for k in ("normalisation", "median_scale", "clip_percentile") if k in build}
    config = PrepareConfig(size=int(build.get("size", 192)), spacing=build.get("spacing", 1.0), **intensity,
                           **({"modalities": tuple(build["modalities"])} if build.get("modalities") else {}))
    prepare(cases, cache, config, num_workers=int(build.get("workers", 2)), mask_labels=mask_labels)


def training_dataset(data_cfg: dict, cache: Path, seed: int, context_slices: int = 0) -> SliceDataset:
    return SliceDataset(cache, split="train", datasets=data_cfg.get("datasets"),
                        modalities=data_cfg.get("modalities"), crop=data_cfg.get("crop"), seed=seed,
                        context_slices=context_slices, flip=bool(data_cfg.get("flip", False)))


def ignore_interrupts(worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: ignore Ctrl-C.

    A terminal's Ctrl-C reaches every process of the foreground group, the DataLoader's workers too.
    The main process turns the first one into a graceful stop at the next step (``StopRequests`` in
    the trainer) and needs its workers for that step; a worker killed by it would fail the step
    instead ("DataLoader worker exited unexpectedly"). The main process ends its workers itself.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_loader(dataset: SliceDataset, batch_size: int, seed: int, num_workers: int = 0,
                    lesion_oversample: int = 1, dataset_oversample: dict | None = None):
    """MCBS batches; the loader's own generator keeps the global RNG untouched (exact resume).
    ``lesion_oversample`` (``data.lesion_oversample``): each slice with a lesion comes this many times
    per epoch; ``dataset_oversample`` (``data.dataset_oversample``, ``{dataset: n}``): each slice of
    that dataset comes n times, e.g. a real cohort of a few cases beside large phantom cohorts. The two
    multiply (see :class:`ModalityConsistentBatchSampler`'s ``repeats``)."""
    if len(dataset) == 0:
        raise ConfigError("the training split is empty: prepare more cases or check data.datasets")
    repeats = np.ones(len(dataset), dtype=np.int64)
    if int(lesion_oversample) != lesion_oversample or lesion_oversample < 1:
        raise ConfigError(f"data.lesion_oversample must be a whole number >= 1 (1: no oversampling), "
                          f"got {lesion_oversample}")
    if lesion_oversample > 1:
        repeats[np.asarray(dataset.lesion_slices, dtype=bool)] *= int(lesion_oversample)
    ids = dataset.dataset_ids
    training = [n for k, n in enumerate(dataset.dataset_names) if (ids == k).any()]
    for name, times in (dataset_oversample or {}).items():
        if name not in training:
            raise ConfigError(f"data.dataset_oversample names {name!r}, which is not a training dataset "
                              f"(this training split has {', '.join(training)})")
        if isinstance(times, bool) or int(times) != times or times < 1:
            raise ConfigError(f"data.dataset_oversample[{name!r}] must be a whole number >= 1, got {times!r}")
        repeats[ids == dataset.dataset_names.index(name)] *= int(times)
    repeats = repeats if (repeats > 1).any() else None
    sampler = ModalityConsistentBatchSampler(dataset.groups, batch_size=batch_size, seed=seed, repeats=repeats)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                        worker_init_fn=ignore_interrupts if num_workers else None)
    return loader, sampler


def validation_samples(data_cfg: dict, cache: Path, slices_per_case: int, max_cases: int,
                       context_slices: int = 0) -> list[dict]:
    """A fixed set of whole validation slices: evenly spaced through the middle of each held-out case.

    Uses the ``val`` split, or ``test`` where ``val`` is empty; two or more sequences are needed.
    """
    for split in ("val", "test"):
        dataset = SliceDataset(cache, split=split, datasets=data_cfg.get("datasets"),
                               modalities=data_cfg.get("modalities"), context_slices=context_slices)
        if len(dataset):
            break
    else:
        logger.warning("no held-out cases in %s: validation is skipped", cache)
        return []
    samples = []
    by_dataset: dict[str, int] = {}
    for case in dataset.cases:
        if by_dataset.get(case["dataset"], 0) >= max_cases or len(case["modalities"]) < 2:
            continue
        by_dataset[case["dataset"]] = by_dataset.get(case["dataset"], 0) + 1
        indices = dataset.case_slices(case["case_id"], case["dataset"])
        picks = np.linspace(0.3, 0.7, slices_per_case) * (len(indices) - 1)
        samples += [dataset[indices[int(round(p))]] for p in picks]
    return samples


def validation_condition(available: torch.Tensor, index: int, reconstruct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed all-but-one condition per validation slice: the target cycles through its sequences."""
    present = available.nonzero().flatten().tolist()
    if reconstruct:
        return available.clone(), available.clone()
    target = present[index % len(present)]
    targets = torch.zeros_like(available)
    targets[target] = True
    return available & ~targets, targets


#: the conditions the diffusion engine's residual weight and interval scales are fitted on (see
#: :func:`calibration_slices`): random subsets held out's coverage to 0.91 for the nominal 0.90 where
#: all-but-one left it at 0.89, real BraTS at 0.87 against 0.82 (BENCHMARKS.md, session 11)
CALIBRATION_CONDITIONS = "random"


def calibration_slices(samples: list[dict], dataset_id: Callable[[int], int],
                       conditions: str = CALIBRATION_CONDITIONS, seed: int = 0,
                       modalities: Sequence[str] | None = None) -> list[tuple]:
    """Validation slices as :func:`mmdiff.pipelines.ldm.calibrate` takes them; ``dataset_id`` maps the
    cache's dataset id to the model's (``-1``: the null dataset).

    ``conditions`` says which sources and targets each slice gets: ``"all-but-one"`` (the condition
    :func:`validation_condition` cycles through), or a :class:`~mmdiff.data.SynthesisConditionSampler`
    mode (``"random"``: any non-empty proper subset of its sequences as sources, the rest as
    targets, drawn with ``seed``; ``modalities``: the sequence names the masks follow). Errors grow
    as sources are taken away, so a scale fitted on the richest condition alone is too narrow for a
    user with fewer sequences."""
    from ..data.conditions import MODES, SynthesisConditionSampler

    if conditions not in MODES:
        raise ValueError(f"unknown calibration conditions {conditions!r}: choose one of {', '.join(MODES)}")
    sampler = None
    if conditions != "all-but-one":
        if modalities is None:
            raise ValueError(f"calibration conditions {conditions!r} need the modality names")
        sampler = SynthesisConditionSampler(conditions, modalities=modalities, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    slices = []
    for i, sample in enumerate(samples):
        if sampler is None:
            sources, targets = validation_condition(sample["available"], i, reconstruct=False)
        else:
            sources, targets = sampler(torch.as_tensor(sample["available"]).bool(), generator)
        slices.append((sample["images"], sources, targets, int(dataset_id(int(sample["dataset_id"]))),
                       sample["brain_mask"], sample.get("context")))
    return slices

