"""The evaluation protocol: synthesis tasks, held-out cases from a prepared cache, the methods scored
(pipelines and two baselines), and per-volume scores inside the brain, the whole image and the lesion.

Normalisation (every table states it): the reference and each candidate volume are divided by three
times the median of their own voxels in the *healthy* brain (brain mask minus the lesion mask, where
the dataset has one) and clipped to [0, 1]; data range 1. The healthy-brain median sits at 1/3. A
bright lesion (enhancing tumour on T1C, restricted diffusion on DWI) cannot move that scale, a global
gain error of a method is not counted against it (only contrast and structure are), and, unlike a
high percentile, the median does not stretch a smooth prediction that regresses to the mean.

Spread and correlation (what a PSNR win is made of): over the brain, ``spread_brain`` is the standard
deviation of the normalised synthetic volume over the real one's and ``corr_brain`` their Pearson
correlation. With the means equal, mean squared error / real variance = spread^2 - 2 spread corr + 1,
smallest at spread = corr: a method that flattens its image toward the mean (a regression does; a
blurred or shrunk prediction does) gains PSNR at the cost of contrast, one that draws the real
contrast (spread 1) pays 2 (1 - corr) for what it gets wrong. Read PSNR beside these two: only a
higher correlation is a better image of the anatomy.

Lesion contrast (what a reader looks at): the mean of a lesion over the mean of the healthy brain,
in the synthetic volume and in the real one, for the whole lesion and each label of the lesion mask
(BraTS: 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing). A synthetic T1C without enhancement
scores about 1 where the real one scores 1.4-1.5 however good its PSNR is.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data.cache import BRAIN_MASK, IMAGES, SEG, case_folder, read_index
from ..modalities import KNOWN_MODALITIES
from ..pipelines.common import diffusion_settings
from ..pipelines.ldm import SCHEDULERS, use_scheduler
from .metrics import mae, masked_ssim, psnr, ssim_map

PROTOCOLS = ("paper", "all-subsets")
REGIONS = ("brain", "whole", "lesion")
NORMALISATION = ("each volume / (3 x the median of its healthy-brain voxels, brain minus lesion), "
                 "clipped to [0, 1]; data range 1")


@dataclass(frozen=True)
class Task:
    """Synthesise ``target`` from ``sources``."""

    sources: tuple[str, ...]
    target: str

    @property
    def name(self) -> str:
        return f"{'+'.join(self.sources)}->{self.target}"

    @classmethod
    def parse(cls, text: str) -> "Task":
        sources, sep, target = text.partition("->")
        if not sep or not sources or not target:
            raise ValueError(f"a task reads SOURCES->TARGET, e.g. t1+t2+flair->t1c; got {text!r}")
        return cls(tuple(s.strip() for s in sources.split("+")), target.strip())


# The paper's one-to-one and many-to-one tasks, and mmdiff's PD task (for models trained with PD).
PAPER_TASKS = tuple(Task.parse(t) for t in (
    "t1->t1c", "t2->flair", "t1->t2", "flair->dwi", "flair->adc",
    "t1+t2->flair", "t1+t2+flair->t1c", "t1+t2+flair->adc", "flair+dwi->adc", "flair+adc->dwi",
    "t1+t2+flair->pd"))


def tasks_for(available: Sequence[str], protocol: str = "paper") -> list[Task]:
    """The protocol's tasks that a case with the ``available`` modalities supports."""
    available = [m for m in KNOWN_MODALITIES if m in available]
    if protocol == "paper":
        return [t for t in PAPER_TASKS if t.target in available and set(t.sources) <= set(available)]
    if protocol == "all-subsets":
        tasks = []
        for target in available:
            others = [m for m in available if m != target]
            for k in range(1, len(others) + 1):
                tasks += [Task(sources, target) for sources in itertools.combinations(others, k)]
        return tasks
    raise ValueError(f"unknown protocol {protocol!r}: choose {' or '.join(PROTOCOLS)}")


@dataclass
class EvalCase:
    """One prepared case: ``images`` modality -> ``[X, Y, Z]`` in [0, 1]; ``brain`` and ``lesion`` bool
    ``[X, Y, Z]``; ``labels`` the lesion mask's labels (uint8, 0 outside). ``scored``: the axial
    slices that are scored (every ``slice_stride``-th); methods get the whole volume, so a 2.5D model
    sees each slice's real neighbours."""

    dataset: str
    case_id: str
    split: str
    images: dict[str, np.ndarray]
    brain: np.ndarray
    lesion: np.ndarray | None
    labels: np.ndarray | None = None
    scored: slice = field(default_factory=lambda: slice(None))


def load_cases(cache: str | Path, split: str | Sequence[str] = "test", datasets: Sequence[str] | None = None,
               slice_stride: int = 1) -> Iterator[EvalCase]:
    """The cases of ``split`` in a prepared cache; every ``slice_stride``-th axial slice is scored."""
    splits = {split} if isinstance(split, str) else set(split)
    for entry in read_index(cache)["cases"]:
        if entry["split"] not in splits or (datasets is not None and entry["dataset"] not in datasets):
            continue
        folder = case_folder(cache, entry)
        images = np.load(folder / IMAGES, mmap_mode="r")
        brain = np.load(folder / BRAIN_MASK, mmap_mode="r")
        seg = np.load(folder / SEG, mmap_mode="r") if entry.get("has_seg") else None
        yield EvalCase(
            dataset=entry["dataset"], case_id=entry["case_id"], split=entry["split"],
            images={m: np.ascontiguousarray(images[:, i].transpose(1, 2, 0), dtype=np.float32)
                    for i, m in enumerate(entry["modalities"])},
            brain=np.ascontiguousarray(brain.transpose(1, 2, 0)) > 0,
            lesion=None if seg is None else np.ascontiguousarray(seg.transpose(1, 2, 0)) > 0,
            labels=None if seg is None else np.ascontiguousarray(seg.transpose(1, 2, 0)),
            scored=slice(None, None, slice_stride),
        )


def check_gamma(gamma: float) -> float:
    """``gamma`` if it can be a source gamma (a positive number), else a ValueError saying so."""
    if not gamma > 0:
        raise ValueError(f"source gamma must be positive, got {gamma!r}")
    return gamma


def with_source_gamma(case: EvalCase, sources: Sequence[str], gamma: float) -> EvalCase:
    """``case`` as another protocol might give it: each of ``sources`` raised to the power ``gamma`` on the
    cache's [0, 1] scale; the other sequences and the masks unchanged (so the reference is the real one).

    A probe of how a method copes with a site whose tissue contrasts differ from its training sites', not
    a model of any scanner: a power law changes the tissues' relative contrast, which no per-volume
    rescaling (the pipelines' normalisation, the evaluation's) undoes; nnU-Net's gamma augmentation
    stands in for protocol differences the same way. ``gamma = 1``: the case itself."""
    if check_gamma(gamma) == 1:
        return case
    images = {m: np.power(v, gamma, dtype=np.float32) if m in sources else v for m, v in case.images.items()}
    return replace(case, images=images)


def robust_normalise(volume: np.ndarray, brain: np.ndarray, lesion: np.ndarray | None) -> np.ndarray:
    """``volume`` / (3 x the median of its healthy-brain voxels), clipped to [0, 1] (see module doc)."""
    healthy = brain & ~lesion if lesion is not None and (brain & ~lesion).any() else brain
    median = float(np.median(volume[healthy])) if healthy.any() else 0.0
    return np.clip(volume / (3 * median), 0, 1).astype(np.float32) if median > 0 else np.zeros_like(volume)


LESION_LABELS = (1, 2, 3)


def lesion_contrast(volume: np.ndarray, brain: np.ndarray, region: np.ndarray) -> float:
    """Mean of ``volume`` in ``region`` over its mean in the healthy brain (brain outside the region's
    lesion); NaN where either is empty or dark."""
    healthy = brain & ~region
    if not region.any() or not healthy.any():
        return float("nan")
    normal = float(volume[healthy].mean())
    return float(volume[region].mean()) / normal if normal > 0 else float("nan")


def contrast_scores(prediction: np.ndarray, reference: np.ndarray, brain: np.ndarray,
                    lesion: np.ndarray | None, labels: np.ndarray | None) -> dict[str, float]:
    """Lesion contrast (module doc) of the synthetic and the real volume: ``contrast_lesion`` /
    ``contrast_lesion_real`` over the whole lesion and ``contrast_label{k}`` / ``..._real`` per label.
    The healthy brain is the brain outside every lesion label."""
    scores = {}
    outside = brain & ~lesion if lesion is not None else brain
    regions = {"lesion": lesion} | {f"label{k}": None if labels is None else labels == k for k in LESION_LABELS}
    for name, region in regions.items():
        for suffix, volume in (("", prediction), ("_real", reference)):
            if region is None or not region.any():
                scores[f"contrast_{name}{suffix}"] = float("nan")
            else:
                scores[f"contrast_{name}{suffix}"] = lesion_contrast(volume, outside | region, region)
    return scores


def spread_scores(prediction: np.ndarray, reference: np.ndarray, brain: np.ndarray) -> dict[str, float]:
    """``spread_brain`` (std of the prediction over the reference's) and ``corr_brain`` (Pearson) over
    the brain voxels of two normalised volumes (module doc); NaN where the reference is flat."""
    p, r = prediction[brain].astype(np.float64), reference[brain].astype(np.float64)
    if p.size < 2 or r.std() == 0:
        return {"spread_brain": float("nan"), "corr_brain": float("nan")}
    spread = float(p.std() / r.std())
    corr = float(np.corrcoef(p, r)[0, 1]) if p.std() > 0 else float("nan")
    return {"spread_brain": spread, "corr_brain": corr}


def score(prediction: np.ndarray, reference: np.ndarray, brain: np.ndarray,
          lesion: np.ndarray | None, labels: np.ndarray | None = None) -> dict[str, float]:
    """Per-volume PSNR, SSIM and MAE in each region (``psnr_brain``, ``ssim_lesion``, ...), after
    :func:`robust_normalise`, the spread and correlation inside the brain (:func:`spread_scores`) and
    the lesion contrasts (:func:`contrast_scores`); a region a case lacks is NaN."""
    normalised = robust_normalise(prediction, brain, lesion), robust_normalise(reference, brain, lesion)
    pred, ref = (torch.from_numpy(volume.transpose(2, 0, 1).copy()) for volume in normalised)
    regions = {"brain": brain, "whole": np.ones_like(brain),
               "lesion": lesion if lesion is not None and lesion.any() else None}
    similarity = ssim_map(pred, ref)  # once, averaged per region below
    scores = {}
    for region, mask in regions.items():
        if mask is None:
            scores |= {f"{metric}_{region}": float("nan") for metric in ("psnr", "ssim", "mae")}
            continue
        mask = torch.from_numpy(mask.transpose(2, 0, 1).copy())
        scores[f"psnr_{region}"] = float(psnr(pred, ref, mask, pooled=True))
        scores[f"ssim_{region}"] = float(masked_ssim(similarity, mask, pooled=True))
        scores[f"mae_{region}"] = float(mae(pred, ref, mask, pooled=True))
    return scores | spread_scores(*normalised, brain) | contrast_scores(prediction, reference, brain, lesion, labels)


def uncertainty_scores(prediction: np.ndarray, reference: np.ndarray, uncertainty: np.ndarray | None,
                       brain: np.ndarray, lesion: np.ndarray | None = None) -> dict[str, float]:
    """How well a per-voxel uncertainty describes the error, over brain voxels (NaN without one).

    ``coverage``: the fraction of voxels with ``|prediction - reference| <= uncertainty``, in the
    pipeline's own [0, 1] units (where its interval was calibrated; not renormalised);
    ``coverage_lesion``: the same over the lesion's brain voxels (NaN without a lesion): where the
    errors are largest and a reader looks, a calibration over the whole brain can hide under-coverage;
    ``spearman_uncertainty``: the rank correlation of the uncertainty with ``|error|`` (1: the larger
    the stated uncertainty, the larger the error; 0: it says nothing about where the errors are).
    """
    nothing = {"coverage": float("nan"), "coverage_lesion": float("nan"), "spearman_uncertainty": float("nan")}
    if uncertainty is None or not brain.any():
        return nothing
    from ..pipelines.ldm import rank_correlation

    error = np.abs(prediction[brain].astype(np.float64) - reference[brain])
    spread = uncertainty[brain].astype(np.float64)
    inside = None if lesion is None else lesion[brain]
    return {"coverage": float(np.mean(error <= spread)),
            "coverage_lesion": float(np.mean(error[inside] <= spread[inside])) if inside is not None and inside.any()
            else float("nan"),
            "spearman_uncertainty": rank_correlation(spread, error)}


# --- methods: each maps (case, task) -> (prediction [X, Y, Z], uncertainty or None) ---

# Contrast most like each target, best first: the "copy the nearest sequence" baseline.
NEAREST = {
    "t1": ("t1c", "flair", "t2", "pd", "dwi", "adc"),
    "t1c": ("t1", "flair", "t2", "pd", "dwi", "adc"),
    "t2": ("adc", "pd", "flair", "dwi", "t1c", "t1"),
    "flair": ("t2", "pd", "dwi", "t1c", "t1", "adc"),
    "dwi": ("flair", "t2", "pd", "adc", "t1c", "t1"),
    "adc": ("t2", "flair", "dwi", "pd", "t1", "t1c"),
    "pd": ("t2", "flair", "dwi", "t1c", "t1", "adc"),
}


class CopyNearest:
    """Baseline: the source whose contrast is nearest the target's (:data:`NEAREST`), copied."""

    name = "copy-nearest"

    def __call__(self, case: EvalCase, task: Task):
        source = next(m for m in NEAREST[task.target] if m in task.sources)
        return case.images[source] * case.brain, None


class VoxelwiseRegression:
    """Baseline: per dataset and task, a least-squares quadratic of the source intensities at each voxel
    (all squares and products), fitted on brain voxels of the dataset's training cases."""

    name = "voxel-regression"

    def __init__(self, cache: str | Path, split: str = "train", voxels: int = 200_000, seed: int = 0):
        self.cache, self.split, self.voxels, self.seed = Path(cache), split, voxels, seed
        self._samples: dict[str, np.ndarray] = {}
        self._fits: dict[tuple[str, Task], np.ndarray] = {}

    @staticmethod
    def features(values: np.ndarray) -> np.ndarray:
        """``[N, S]`` source intensities -> ``[N, F]``: 1, each source, every product of two."""
        pairs = [values[:, i] * values[:, j] for i, j in itertools.combinations_with_replacement(range(values.shape[1]), 2)]
        return np.column_stack([np.ones(len(values)), values, *pairs])

    def samples(self, dataset: str) -> np.ndarray:
        """Brain voxels of the dataset's training cases, read once: ``[N, K]`` over
        :data:`~mmdiff.modalities.KNOWN_MODALITIES`, NaN where a case lacks the modality."""
        if dataset not in self._samples:
            rng = np.random.default_rng(self.seed)
            cases = list(load_cases(self.cache, self.split, datasets=[dataset]))
            rows = []
            for case in cases:
                index = np.flatnonzero(case.brain[..., ::2])
                index = rng.choice(index, size=min(len(index), self.voxels // max(1, len(cases))), replace=False)
                table = np.full((len(index), len(KNOWN_MODALITIES)), np.nan, dtype=np.float32)
                for m, image in case.images.items():
                    table[:, KNOWN_MODALITIES.index(m)] = image[..., ::2].reshape(-1)[index]
                rows.append(table)
            self._samples[dataset] = (np.concatenate(rows) if rows
                                      else np.empty((0, len(KNOWN_MODALITIES)), np.float32))
        return self._samples[dataset]

    def fit(self, dataset: str, task: Task) -> np.ndarray:
        key = (dataset, task)
        if key not in self._fits:
            columns = [KNOWN_MODALITIES.index(m) for m in (*task.sources, task.target)]
            table = self.samples(dataset)[:, columns]
            table = table[~np.isnan(table).any(axis=1)]
            if not len(table):
                raise ValueError(f"no {self.split} case of {dataset} has {task.name}: cannot fit the regression")
            self._fits[key] = np.linalg.lstsq(self.features(table[:, :-1]), table[:, -1], rcond=None)[0]
        return self._fits[key]

    def __call__(self, case: EvalCase, task: Task):
        coef = self.fit(case.dataset, task)
        values = np.stack([case.images[m][case.brain] for m in task.sources], axis=1)
        out = np.zeros_like(case.brain, dtype=np.float32)
        out[case.brain] = np.clip(self.features(values) @ coef, 0, 1)
        return out, None


class PipelineMethod:
    """An mmdiff pipeline (LDM or GAN) as an evaluation method; a fixed seed per slice.

    ``precision`` is passed to each call (default ``"auto"``: what a user of this machine gets).
    ``scheduler`` (a name in :data:`mmdiff.pipelines.SCHEDULERS`) is set on the pipeline before each
    call, so methods that share one diffusion pipeline can differ in scheduler and steps. A task with a
    sequence the model does not know is not one it can do (:meth:`supports`). A 2.5D model
    (``pipeline.context_slices > 0``) gets the whole volume and runs on the scored slices only
    (``slices=``), so each scored slice has its real neighbours; any other model gets only the
    scored slices. ``flip_average`` (GAN pipelines) runs it with ``flip_average=True``.
    ``unseen_site``: the pipeline gets no dataset (``dataset=None``, the null embedding), as a scan from
    a site the model was not trained on does; otherwise each case's own dataset.
    """

    def __init__(self, pipeline, name: str, steps: int | None = None, samples: int | None = None, seed: int = 0,
                 batch_size: int = 16, scheduler: str | None = None, precision: str = "auto",
                 flip_average: bool = False, unseen_site: bool = False):
        self.pipeline, self.name = pipeline, name
        self.unseen_site = bool(unseen_site)
        if flip_average and pipeline.engine != "gan":
            raise ValueError("flip averaging is for the GAN engine")
        self.flip_average = flip_average
        self.precision = precision  # the networks' (mmdiff.pipelines.precision); "auto" as users get it
        self.is_diffusion = pipeline.engine == "ldm"
        # None: the pipeline's own defaults
        self.steps, self.samples = diffusion_settings(pipeline, steps, samples) if self.is_diffusion else (steps, 1)
        self.seed, self.batch_size = seed, batch_size
        self.scheduler = scheduler
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}: choose one of {', '.join(SCHEDULERS)}")

    def supports(self, task: Task) -> bool:
        return set(task.sources) | {task.target} <= set(self.pipeline.modalities)

    def __call__(self, case: EvalCase, task: Task):
        whole = getattr(self.pipeline, "context_slices", 0) > 0
        scored = slice(None) if whole else case.scored
        slices = np.arange(case.brain.shape[2])[scored]
        kwargs = {}
        if self.is_diffusion:
            if self.scheduler is not None:
                use_scheduler(self.pipeline, self.scheduler)
            generators = [torch.Generator().manual_seed(self.seed + int(k)) for k in slices]  # per slice of the case
            kwargs = {"num_inference_steps": self.steps, "num_samples": self.samples, "generator": generators}
        if whole:
            kwargs["slices"] = np.arange(case.brain.shape[2])[case.scored]
        if self.flip_average:
            kwargs["flip_average"] = True
        dataset = None if self.unseen_site else case.dataset
        result = self.pipeline({m: case.images[m][..., scored] for m in task.sources}, dataset=dataset,
                               targets=[task.target], brain_mask=case.brain[..., scored], batch_size=self.batch_size,
                               precision=self.precision, **kwargs)
        outputs = [result.images[task.target], None if result.uncertainty is None else result.uncertainty[task.target]]
        if not whole:  # back onto the case's slices (the others are not scored)
            for n, output in enumerate(outputs):
                if output is not None:
                    full = np.zeros(case.brain.shape, dtype=np.float32)
                    full[..., scored] = output
                    outputs[n] = full
        return tuple(outputs)


BASELINES = {CopyNearest.name: lambda cache: CopyNearest(), VoxelwiseRegression.name: VoxelwiseRegression}
