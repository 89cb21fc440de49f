"""Preparation: cases from any source become a slice cache (nnU-Net's "preprocess" step).

Per case: every file is read in canonical orientation and resampled by its affine onto one grid
(the reference file's field of view at the configured spacing; the lesion mask's grid where there
is one, else DWI's, else the first modality's), a brain mask is taken from the case or derived, the
brain is centred and cropped/padded in-plane to ``size x size``, axial slices without brain are
dropped, and each modality is brought to [0, 1] by the cache's
:class:`~mmdiff.data.preprocessing.MRIPreprocessor` (background 0), the rule a model trained on the
cache carries into its pipeline. A case-level train/val/test split is kept in ``splits.json``: cases keep their split
when others are added, and no case is ever in two splits.

The cache layout is owned by :mod:`mmdiff.data.cache`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import traceback
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.processing import resample_from_to, resample_to_output
from scipy import ndimage
from tqdm.auto import tqdm

from .. import __version__
from ..io import VolumeError, atomic_dir, load_volume, write_json
from ..modalities import MODALITIES
from .cache import (BRAIN_MASK, CACHE_FORMAT, CACHE_JSON, IMAGES, INDEX_JSON, META, SEG, SPLITS_JSON, SUMMARY_JSON,
                    dataset_id, finished_cases, read_info)
from .cache import case_dir as case_dir_for
from .manifest import MASK_KINDS, Case
from .preprocessing import MRIPreprocessor


#: how a source's lesion masks are numbered (``mmdiff prepare --mask-labels NAME=CONVENTION``, a data
#: config source's ``mask_labels``): "brats" (the default) reads BraTS tumour sub-regions and binary
#: masks; "binary" reads every non-zero voxel as lesion, for masks that number each lesion (1, 2, 3...),
#: whose lesions 2, 3 and 4 "brats" would read as oedema and enhancing tumour
MASK_LABELS = ("brats", "binary")
DEFAULT_MASK_LABELS = MASK_LABELS[0]


def check_mask_labels(conventions: dict[str, str] | None) -> dict[str, str]:
    """``{dataset: convention}`` checked against :data:`MASK_LABELS`; a dataset not named is "brats"."""
    conventions = dict(conventions or {})
    for name, convention in conventions.items():
        if convention not in MASK_LABELS:
            raise ValueError(f"mask labels {convention!r} for dataset {name!r}: choose one of {', '.join(MASK_LABELS)}")
    return conventions


def lesion_labels(seg: np.ndarray, convention: str = DEFAULT_MASK_LABELS) -> np.ndarray:
    """The cache's labels (uint8: 0 background, 1 lesion or necrotic core, 2 oedema, 3 enhancing
    tumour) from a source's mask as stored.

    ``convention="brats"``: BraTS 2018-2021 mark enhancing tumour 4: it becomes 3, the BraTS 2023
    convention. A value above 4 is no BraTS label: it is a binary mask stored at an image's full scale,
    as the WML cohort's 8-bit masks are (255; 254 in one subject), and it becomes 1, the label every
    other cohort gives its lesions, so that what is keyed on labels (``model.lesion_weight={1: ...}``,
    the lesion-contrast table) treats those lesions as lesions. A mask with more than four distinct
    labels is refused (a :class:`~mmdiff.io.VolumeError` naming the fix): it numbers its lesions, and
    read as BraTS its lesions 2, 3 and 4 would become oedema and enhancing tumour.
    ``convention="binary"``: every non-zero voxel is lesion (1).
    Fractional values (an interpolated mask) round first.
    """
    if convention not in MASK_LABELS:
        raise ValueError(f"mask labels {convention!r}: choose one of {', '.join(MASK_LABELS)}")
    labels = np.rint(np.asarray(seg, dtype=np.float32)).astype(np.int32)
    if convention == "binary":
        return (labels > 0).astype(np.uint8)
    values = np.unique(labels[labels > 0])
    if len(values) > 4:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise VolumeError(f"its lesion mask holds {len(values)} labels ({shown}): a mask that numbers its lesions? "
                          "BraTS-style masks hold 1, 2 and 3 or 4; prepare this dataset with mask labels "
                          "'binary' (mmdiff prepare --mask-labels NAME=binary, or mask_labels: binary in the "
                          "data config's source)")
    labels[labels == 4] = 3
    labels[labels > 4] = 1
    return np.clip(labels, 0, 3).astype(np.uint8)


@dataclass
class PrepareConfig:
    """How cases become slices. Stored in ``cache.json``; a cache is only extended with the same one."""

    size: int = 192
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    modalities: tuple[str, ...] = MODALITIES
    normalisation: str = "median"
    median_scale: float = 3.0
    clip_percentile: float = 99.5
    min_brain_pixels: int = 64
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self):
        self.spacing = tuple(float(s) for s in (self.spacing if isinstance(self.spacing, Sequence)
                                                 else (self.spacing,) * 3))
        self.modalities = tuple(self.modalities)
        if self.size < 8:
            raise ValueError(f"size must be at least 8, got {self.size}")
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers, got {self.spacing}")
        self.preprocessor  # checks the intensity settings
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must be below 1")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @property
    def preprocessor(self) -> MRIPreprocessor:
        """The intensity rule (the component a model trained on this cache is saved with)."""
        return MRIPreprocessor(normalisation=self.normalisation, median_scale=self.median_scale,
                               clip_percentile=self.clip_percentile)

    def geometry(self) -> dict:
        """The settings that change the arrays (not the split fractions)."""
        d = self.to_dict()
        return {k: d[k] for k in ("size", "spacing", "modalities", "normalisation", "median_scale",
                                  "clip_percentile", "min_brain_pixels")}


@dataclass
class CaseResult:
    dataset: str
    case_id: str
    status: str  # "prepared" | "cached" | "skipped"
    reason: str = ""
    slices: int = 0
    warnings: list[str] = field(default_factory=list)


def _reference_kind(files: dict[str, Path]) -> str:
    for kind in ("seg", "dwi"):
        if kind in files:
            return kind
    return next(k for k in files if k not in MASK_KINDS)


def _on_grid(img: nib.Nifti1Image, spacing) -> bool:
    zooms = np.sqrt((img.affine[:3, :3] ** 2).sum(axis=0))
    off_diagonal = img.affine[:3, :3] - np.diag(np.diag(img.affine[:3, :3]))
    return np.allclose(zooms, spacing, atol=1e-3) and np.allclose(off_diagonal, 0, atol=1e-6)


def load_case_on_grid(case: Case, config: PrepareConfig) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Read a case's files onto one canonical grid at ``config.spacing``. Returns arrays, affine, warnings."""
    warnings_: list[str] = []
    images: dict[str, nib.Nifti1Image] = {}
    for kind, path in case.files.items():
        if kind not in MASK_KINDS and kind not in config.modalities:
            warnings_.append(f"{kind} ignored (not in the configured modalities)")
            continue
        vol = load_volume(path)
        if vol.nonfinite:
            warnings_.append(f"{kind}: {vol.nonfinite} NaN/Inf voxels set to 0")
        images[kind] = nib.Nifti1Image(vol.data, vol.affine)
    if not any(k not in MASK_KINDS for k in images):
        raise VolumeError("no image of a configured modality")
    ref_kind = _reference_kind(images)
    ref = images[ref_kind]
    for kind, img in images.items():
        if kind not in MASK_KINDS and not same_grid(img, ref):
            warnings_.append(f"{kind} is on another grid than {ref_kind}: resampled by the affines")
    if not _on_grid(ref, config.spacing):
        ref = resample_to_output(ref, voxel_sizes=config.spacing, order=0 if ref_kind == "seg" else 1)
    target = (ref.shape, ref.affine)
    out = {}
    for kind, img in images.items():
        if kind == ref_kind or same_grid(img, ref):
            out[kind] = np.asarray((ref if kind == ref_kind else img).dataobj, dtype=np.float32)
            continue
        if not grids_overlap(img, ref):
            raise VolumeError(f"{kind} does not overlap the {ref_kind} grid (check the affines)")
        # labels take nearest neighbour; a binary brain mask is interpolated and thresholded (smooth edge)
        order = 0 if kind == "seg" else 1
        out[kind] = resample_from_to(img, target, order=order, cval=0.0).get_fdata(dtype=np.float32)
    return out, ref.affine, warnings_


def same_grid(a, b) -> bool:
    """Same voxel grid: shape and affine (images or :class:`mmdiff.io.Volume`)."""
    return a.shape == b.shape and np.allclose(a.affine, b.affine, atol=1e-4)


def grids_overlap(img, ref) -> bool:
    """Whether two grids' fields of view (corner boxes in world mm) intersect."""
    def box(im):
        corners = np.array([[i, j, k, 1] for i in (0, im.shape[0] - 1) for j in (0, im.shape[1] - 1)
                            for k in (0, im.shape[2] - 1)], dtype=float)
        world = corners @ im.affine.T
        return world[:, :3].min(0), world[:, :3].max(0)

    (a0, a1), (b0, b1) = box(img), box(ref)
    return bool(np.all(a0 <= b1) and np.all(b0 <= a1))


def derive_brain_mask(images: Iterable[np.ndarray]) -> np.ndarray:
    """Brain mask of skull-stripped volumes: union of above-noise voxels, cleaned up.

    Each modality is thresholded at 5 % of its 99th percentile (above Rician background noise),
    the union is opened, its largest component kept and holes filled slice by slice. The axial ends
    are padded with edge copies first: the 3D opening and closing would otherwise erode brain in the
    first and last slices (and all of a single slice). The morphology runs on the union's bounding box
    grown by a margin wider than the closing reaches, which gives the same mask as the whole grid in
    a fraction of the time (a head fills a third of its grid).
    """
    images = [np.asarray(img) for img in images]
    union = None
    for img in images:
        positive = img[img > 0]
        if positive.size == 0:
            continue
        fg = img > 0.05 * np.percentile(positive, 99)
        union = fg if union is None else union | fg
    if union is None or not union.any():
        raise VolumeError("every image is empty")
    margin = 4  # > the closing's 2 iterations: nothing outside the box can change
    box = tuple(slice(max(int(idx.min()) - margin, 0), int(idx.max()) + margin + 1)
                for idx in (np.flatnonzero(union.any(axis=(1, 2))), np.flatnonzero(union.any(axis=(0, 2)))))
    part = np.pad(union[box], ((0, 0), (0, 0), (2, 2)), mode="edge")
    part = ndimage.binary_opening(part, iterations=1)
    labels, n = ndimage.label(part)
    if n > 1:
        sizes = np.bincount(labels.ravel())
        sizes[0] = 0
        part = labels == int(np.argmax(sizes))
    part = ndimage.binary_closing(part, iterations=2)[..., 2:-2]
    in_plane = np.zeros((3, 3, 3), bool)
    in_plane[:, :, 1] = ndimage.generate_binary_structure(2, 1)  # holes are filled per axial slice
    part = ndimage.binary_fill_holes(part, structure=in_plane)
    mask = np.zeros(union.shape, dtype=bool)
    mask[box] = part
    return mask


def crop_or_pad(volume: np.ndarray, centre: Sequence[int], size: int) -> np.ndarray:
    """In-plane ``size x size`` window of ``volume[X, Y, ...]`` centred on ``centre``, zero-padded."""
    out = np.zeros((size, size) + volume.shape[2:], dtype=volume.dtype)
    src, dst = [], []
    for axis in range(2):
        start = int(centre[axis]) - size // 2
        lo, hi = max(start, 0), min(start + size, volume.shape[axis])
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[dst[0], dst[1]] = volume[src[0], src[1]]
    return out


def prepare_case(case: Case, config: PrepareConfig, case_dir: Path, mask_labels: str = DEFAULT_MASK_LABELS) -> CaseResult:
    """Prepare one case into ``case_dir`` (written to a temporary folder, then renamed); ``mask_labels``:
    how its lesion mask is numbered (:data:`MASK_LABELS`)."""
    arrays, affine, notes = load_case_on_grid(case, config)
    present = [m for m in config.modalities if m in arrays]
    if "brainmask" in arrays:
        brain = arrays["brainmask"] >= 0.5
    else:
        brain = derive_brain_mask(arrays[m] for m in present)
    keep = np.flatnonzero(brain.sum(axis=(0, 1)) >= config.min_brain_pixels)
    if keep.size == 0:
        raise VolumeError("no axial slice has brain in it")
    coords = np.argwhere(brain)
    centre = ((coords[:, 0].min() + coords[:, 0].max()) // 2, (coords[:, 1].min() + coords[:, 1].max()) // 2)
    extent = coords.max(0) - coords.min(0) + 1
    if max(extent[:2]) > config.size:
        notes.append(f"brain ({extent[0]}x{extent[1]} voxels) is larger than {config.size}: edges cropped")
    scales = {}
    stack = []
    preprocessor = config.preprocessor
    for m in present:
        norm, scales[m] = preprocessor.normalise(arrays[m], brain)
        if scales[m] <= 0:
            notes.append(f"{m} is empty inside the brain")
        stack.append(crop_or_pad(norm[..., keep], centre, config.size))
    images = np.stack(stack, axis=0).transpose(3, 0, 1, 2)  # [S, A, H, W]
    brain_c = crop_or_pad(brain[..., keep], centre, config.size).transpose(2, 0, 1)
    if "seg" in arrays:
        seg = crop_or_pad(lesion_labels(arrays["seg"], mask_labels)[..., keep], centre, config.size).transpose(2, 0, 1)
    else:
        seg = np.zeros_like(brain_c, dtype=np.uint8)
    meta = {
        "case_id": case.case_id,
        "dataset": case.dataset,
        "modalities": present,
        "slices": int(keep.size),
        "slice_index": keep.tolist(),
        "grid_affine": affine.tolist(),
        "crop_centre": [int(c) for c in centre],
        "clip_values": scales,
        "has_seg": "seg" in arrays,
        "sources": {k: str(v) for k, v in case.files.items()},
        "notes": notes,
    }
    with atomic_dir(case_dir) as tmp:
        np.save(tmp / IMAGES, images.astype(np.float16))
        np.save(tmp / BRAIN_MASK, brain_c.astype(np.uint8))
        np.save(tmp / SEG, seg)
        write_json(tmp / META, meta)
    return CaseResult(case.dataset, case.case_id, "prepared", slices=int(keep.size), warnings=notes)


def _prepare_worker(case: Case, config: PrepareConfig, case_dir: Path, mask_labels: str = DEFAULT_MASK_LABELS) -> CaseResult:
    try:
        return prepare_case(case, config, case_dir, mask_labels)
    except (VolumeError, OSError, ValueError, MemoryError) as exc:
        return CaseResult(case.dataset, case.case_id, "skipped", reason=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # an unexpected failure is reported with its origin, never fatal for the rest
        where = traceback.extract_tb(exc.__traceback__)[-1]
        return CaseResult(case.dataset, case.case_id, "skipped",
                          reason=f"{type(exc).__name__}: {exc} ({Path(where.filename).name}:{where.lineno})")


def _open_cache(cache: Path, config: PrepareConfig, datasets: list[str], mask_labels: dict[str, str]) -> dict:
    """Create ``cache.json`` or check that an existing cache is of this format and was made with the
    same geometry, and that no dataset in it had its masks read under another convention. Only
    conventions other than "brats" are recorded (``"mask_labels": {dataset: convention}``)."""
    path = cache / CACHE_JSON
    if path.exists():
        info = read_info(cache)
        if info["config"]["geometry"] != config.geometry():
            raise ValueError(
                f"{cache} was prepared with {info['config']['geometry']}; this run asks for "
                f"{config.geometry()}. Use another --out folder for other settings."
            )
    else:
        info = {"format": CACHE_FORMAT, "mmdiff_version": __version__,
                "config": {**config.to_dict(), "geometry": config.geometry()}, "datasets": []}
    recorded = info.get("mask_labels", {})
    for name in datasets:
        before, now = recorded.get(name, DEFAULT_MASK_LABELS), mask_labels.get(name, DEFAULT_MASK_LABELS)
        if name in info["datasets"] and before != now:
            raise ValueError(f"{cache}: dataset {name!r} was prepared with mask labels {before!r}; this run reads "
                             f"its masks as {now!r}. Prepare it with the same mask labels, or use another --out folder")
    for name in datasets:
        if name not in info["datasets"]:
            info["datasets"].append(name)  # append only: dataset ids never change
            if mask_labels.get(name, DEFAULT_MASK_LABELS) != DEFAULT_MASK_LABELS:
                info.setdefault("mask_labels", {})[name] = mask_labels[name]
    write_json(path, info)
    return info


def assign_splits(keys: list[str], existing: dict[str, str], config: PrepareConfig) -> dict[str, str]:
    """Case-level splits per dataset; existing assignments are kept, new cases fill the fractions.

    Order among new cases is a hash of (seed, key), so the split does not depend on input order.
    """
    splits = dict(existing)
    by_dataset: dict[str, list[str]] = {}
    for key in keys:
        by_dataset.setdefault(key.split("/", 1)[0], []).append(key)
    targets = {"val": config.val_fraction, "test": config.test_fraction}
    for members in by_dataset.values():
        new = sorted((k for k in members if k not in splits),
                     key=lambda k: hashlib.sha256(f"{config.seed}:{k}".encode()).hexdigest())
        for key in new:
            n = sum(1 for k in members if k in splits) + 1
            counts = {s: sum(1 for k in members if splits.get(k) == s) for s in targets}
            # small datasets still hold out one test case (from 2 cases: a real cohort of two is
            # scored on one) and one validation case (from 4)
            want = {s: max(np.floor(frac * n + 0.5), 1 if n >= minimum else 0)
                    for (s, frac), minimum in zip(targets.items(), (4, 2))}
            short = [s for s in ("test", "val") if counts[s] < want[s]]
            splits[key] = short[0] if short else "train"
    return splits


def prepare(
    cases: list[Case],
    cache: str | os.PathLike,
    config: PrepareConfig | None = None,
    num_workers: int = 1,
    progress: bool = True,
    mask_labels: dict[str, str] | None = None,
) -> dict:
    """Prepare ``cases`` into the slice cache at ``cache``; finished cases are skipped on a re-run.

    ``mask_labels``: ``{dataset: convention}`` for datasets whose lesion masks are not BraTS-style
    (:data:`MASK_LABELS`); recorded in ``cache.json``, so a dataset is never extended under another.
    Returns the run summary (also written to ``summary.json``).
    """
    config = config or PrepareConfig()
    mask_labels = check_mask_labels(mask_labels)
    cache = Path(cache)
    seen = set()
    for case in cases:
        key = (case.dataset, case.case_id)
        if key in seen:
            raise ValueError(f"case {case.case_id!r} appears twice in dataset {case.dataset!r}")
        seen.add(key)
    if (cache / CACHE_JSON).is_file():
        read_info(cache)  # a cache of another format: refused before anything in it changes
    _check_case_folders(cases, cache)
    cache.mkdir(parents=True, exist_ok=True)
    for stale in cache.glob("cases/*/.*"):  # case folders a killed run left half-written (atomic_dir's names)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
    _open_cache(cache, config, list(dict.fromkeys(c.dataset for c in cases)), mask_labels)
    results: list[CaseResult] = []
    todo = []
    for case in cases:
        meta_path = case_dir_for(cache, case.dataset, case.case_id) / META
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            results.append(CaseResult(case.dataset, case.case_id, "cached", slices=meta["slices"]))
        else:
            todo.append(case)
    bar = tqdm(total=len(todo), desc="prepare", unit="case", disable=not progress)
    if num_workers > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=num_workers) as pool:
            futures = [pool.submit(_prepare_worker, c, config, case_dir_for(cache, c.dataset, c.case_id),
                                   mask_labels.get(c.dataset, DEFAULT_MASK_LABELS)) for c in todo]
            for fut in as_completed(futures):
                results.append(fut.result())
                bar.update()
    else:
        for case in todo:
            results.append(_prepare_worker(case, config, case_dir_for(cache, case.dataset, case.case_id),
                                           mask_labels.get(case.dataset, DEFAULT_MASK_LABELS)))
            bar.update()
    bar.close()
    return _finish(cache, config, results)


def _check_case_folders(cases: list[Case], cache: Path) -> None:
    """Refuse, before any work, two cases that :func:`safe_name` puts in one folder (``a/b`` and ``a_b``),
    or a case whose folder in the cache holds another case: one would silently replace the other."""
    owners: dict[Path, Case] = {}
    for case in cases:
        folder = case_dir_for(cache, case.dataset, case.case_id)
        other = owners.setdefault(folder, case)
        if other is not case:
            raise ValueError(f"cases {other.dataset}/{other.case_id!r} and {case.dataset}/{case.case_id!r} would share "
                             f"the cache folder {folder.relative_to(cache)}: rename one of them (in the manifest)")
        meta = folder / "meta.json"
        if meta.exists():
            found = json.loads(meta.read_text())
            if (found.get("dataset"), found.get("case_id")) != (case.dataset, case.case_id):
                raise ValueError(f"case {case.dataset}/{case.case_id!r} would use the cache folder "
                                 f"{folder.relative_to(cache)}, which holds {found.get('dataset')}/"
                                 f"{found.get('case_id')!r}: rename the case, or use another --out")


def _finish(cache: Path, config: PrepareConfig, results: list[CaseResult]) -> dict:
    """Write splits, index and summary from every finished case in the cache."""
    info = read_info(cache)
    metas = finished_cases(cache)
    splits_path = cache / SPLITS_JSON
    existing = json.loads(splits_path.read_text()) if splits_path.exists() else {}
    keys = [f"{m['dataset']}/{m['case_id']}" for m in metas]
    splits = assign_splits(keys, existing, config)
    write_json(splits_path, splits)
    index = []
    for meta, key in zip(metas, keys):
        index.append({
            "dataset": meta["dataset"],
            "dataset_id": dataset_id(info["datasets"], meta["dataset"]),
            "case_id": meta["case_id"],
            "path": str(case_dir_for(cache, meta["dataset"], meta["case_id"]).relative_to(cache)),
            "modalities": meta["modalities"],
            "slices": meta["slices"],
            "has_seg": meta["has_seg"],
            "split": splits[key],
        })
    write_json(cache / INDEX_JSON, {"datasets": info["datasets"], "modalities": info["config"]["modalities"],
                                      "size": info["config"]["size"], "cases": index})
    summary = {
        "cache": str(cache),
        "prepared": sum(r.status == "prepared" for r in results),
        "cached": sum(r.status == "cached" for r in results),
        "skipped": [{"dataset": r.dataset, "case_id": r.case_id, "reason": r.reason}
                    for r in results if r.status == "skipped"],
        "warnings": {f"{r.dataset}/{r.case_id}": r.warnings for r in results if r.warnings},
        "cases_in_cache": len(index),
        "slices_in_cache": int(sum(c["slices"] for c in index)),
        "splits": {s: sum(c["split"] == s for c in index) for s in ("train", "val", "test")},
    }
    write_json(cache / SUMMARY_JSON, summary)
    return summary


def format_summary(summary: dict) -> str:
    """The run summary as a few readable lines."""
    lines = [
        f"prepared {summary['prepared']} case(s), {summary['cached']} already cached, "
        f"{len(summary['skipped'])} skipped",
        f"cache: {summary['cases_in_cache']} cases, {summary['slices_in_cache']} slices "
        f"(train {summary['splits']['train']}, val {summary['splits']['val']}, test {summary['splits']['test']})",
    ]
    for s in summary["skipped"]:
        lines.append(f"  skipped {s['dataset']}/{s['case_id']}: {s['reason']}")
    for key, notes in summary["warnings"].items():
        for note in notes:
            lines.append(f"  note {key}: {note}")
    return "\n".join(lines)
