"""The slice cache's format, owned here: where each file lies, how cases and datasets are named
and numbered, and what identifies a cache's data. ``prepare`` writes it, and the dataset, the
evaluation protocol, the downstream check and the training record read it, all through this module.

Layout::

    CACHE/cache.json                  the preparation config and the dataset names (ids = positions)
    CACHE/splits.json                 {"<dataset>/<case_id>": "train" | "val" | "test"}
    CACHE/index.json                  every prepared case with its modalities, slices and split
    CACHE/summary.json                what the last run read, skipped and why
    CACHE/cases/<dataset>/<case_id>/  images.npy float16 [S, A, H, W] (A = available modalities),
                                      brain_mask.npy uint8 [S, H, W], seg.npy uint8 [S, H, W],
                                      meta.json (written last: a case without it is unfinished)

``seg.npy`` labels: 0 background, 1 lesion (BraTS: necrotic / non-enhancing core; MS, WML and stroke
masks: the lesion), 2 oedema, 3 enhancing tumour (how a source's mask becomes these:
:func:`mmdiff.data.prepare.lesion_labels`). ``cache.json`` records the ``format`` (``CACHE_FORMAT``);
a cache of an older format is refused with what changed, never read as if it were current.

``<dataset>`` and ``<case_id>`` are :func:`safe_name` versions of the names; ``index.json`` keeps
the real names and each case's folder relative to the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path

CACHE_JSON, SPLITS_JSON, INDEX_JSON, SUMMARY_JSON = "cache.json", "splits.json", "index.json", "summary.json"
CASES = "cases"
# 2: binary lesion masks stored at an image's full scale (255) are label 1 (format 1 kept them as 255)
CACHE_FORMAT = 2
FORMAT_CHANGES = {2: "binary lesion masks stored as 255 (the WML cohort's) are now label 1, as every other "
                     "cohort's lesions are; format-1 caches kept 255, which label-keyed lesion weights never matched"}
IMAGES, BRAIN_MASK, SEG, META = "images.npy", "brain_mask.npy", "seg.npy", "meta.json"


class CacheError(ValueError):
    """A cache that is missing, or does not hold what was asked of it."""


def safe_name(name: str) -> str:
    """A file-system-safe version of a case or dataset name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "case"


def case_dir(cache: str | os.PathLike, dataset: str, case_id: str) -> Path:
    """The folder of one case (its names made safe)."""
    return Path(cache) / CASES / safe_name(dataset) / safe_name(case_id)


def finished_cases(cache: str | os.PathLike) -> list[dict]:
    """The ``meta.json`` of every finished case, in folder order."""
    return [json.loads(p.read_text()) for p in sorted((Path(cache) / CASES).glob(f"*/*/{META}"))]


def read_info(cache: str | os.PathLike) -> dict:
    """``cache.json``: the preparation config and the dataset names (a cache of an older format:
    :class:`CacheError`, see :func:`check_format`)."""
    info = json.loads((Path(cache) / CACHE_JSON).read_text())
    check_format(cache, info)
    return info


def check_format(cache: str | os.PathLike, info: dict) -> None:
    """Refuse a cache written in another format than this mmdiff's, saying what changed and how to
    make a current one (prepare the sources again into a new folder; the old one is left as it is)."""
    found = int(info.get("format", 1))
    if found == CACHE_FORMAT:
        return
    if found > CACHE_FORMAT:
        raise CacheError(f"{cache} was prepared by a newer mmdiff (cache format {found}; this one reads "
                         f"{CACHE_FORMAT}): upgrade mmdiff")
    changes = "; ".join(FORMAT_CHANGES.get(f, f"format {f}") for f in range(found + 1, CACHE_FORMAT + 1))
    raise CacheError(f"{cache} is a cache of format {found}, this mmdiff's is {CACHE_FORMAT} ({changes}): "
                     f"prepare the sources again into a new folder (or remove this one; a training "
                     f"config's data.build then remakes it)")


def cache_preprocessor(cache: str | os.PathLike):
    """The intensity rule a cache was prepared with (caches from before the rule was stored: the
    percentile rule with their ``clip_percentile``)."""
    config = read_info(cache)["config"]
    from .preprocessing import MRIPreprocessor  # diffusers is imported only when this is asked

    return MRIPreprocessor(normalisation=config.get("normalisation", "percentile"),
                           median_scale=config.get("median_scale", 3.0),
                           clip_percentile=config.get("clip_percentile", 99.5))


def read_index(cache: str | os.PathLike) -> dict:
    """``index.json``: ``datasets``, ``modalities``, ``size`` and the ``cases`` (of a cache of this
    mmdiff's format only)."""
    path = Path(cache) / INDEX_JSON
    if not path.is_file():
        raise CacheError(f"{cache} is not a prepared cache (no {INDEX_JSON}): run `mmdiff prepare` first")
    if (Path(cache) / CACHE_JSON).is_file():
        read_info(cache)  # checks the format
    return json.loads(path.read_text())


def case_folder(cache: str | os.PathLike, entry: dict) -> Path:
    """The folder of a case of ``index.json``."""
    return Path(cache) / entry["path"]


def dataset_id(dataset_names: Sequence[str], dataset: str) -> int:
    """A dataset's id: its position in the cache's dataset list (append-only, so ids never change)."""
    try:
        return list(dataset_names).index(dataset)
    except ValueError:
        raise CacheError(f"dataset {dataset!r} is not in this cache (it has {list(dataset_names)})") from None


def fingerprint(cache: str | os.PathLike) -> str:
    """A short hash of what the cache holds: its format, preparation config, how its masks were read
    (datasets not read as "brats") and every case (dataset, name, modalities, slices, split). The same
    data prepared the same way gives the same fingerprint, wherever the cache lies; it does not read the
    arrays."""
    info, index = read_info(cache), read_index(cache)
    cases = sorted((c["dataset"], c["case_id"], list(c["modalities"]), int(c["slices"]), c["split"])
                   for c in index["cases"])
    record = {"format": int(info.get("format", 1)), "config": info["config"], "datasets": index["datasets"],
              "cases": cases}  # the format: the same sources prepared by another format are other data
    if info.get("mask_labels"):  # masks read as other labels are other data (absent: every dataset "brats")
        record["mask_labels"] = info["mask_labels"]
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def describe(cache: str | os.PathLike, datasets: Sequence[str] | None = None) -> dict:
    """What identifies a cache's data, for a training record or a model card: its fingerprint, the
    preparation config, and per dataset (all, or ``datasets``) its id, case counts per split and
    per modality, and the held-out cases by name (``held_out``: ``{"val": [...], "test": [...]}``,
    so that a user can tell a model's unseen cases from the ones it trained on). No path: a record
    stays true on another machine."""
    info, index = read_info(cache), read_index(cache)
    summary = {}
    for name in index["datasets"]:
        if datasets is not None and name not in datasets:
            continue
        cases = [c for c in index["cases"] if c["dataset"] == name]
        summary[name] = {
            "id": dataset_id(index["datasets"], name),
            "cases": len(cases),
            "splits": {s: sum(c["split"] == s for c in cases) for s in ("train", "val", "test")},
            "slices": int(sum(c["slices"] for c in cases)),
            "modalities": {m: sum(m in c["modalities"] for c in cases) for m in index["modalities"]
                           if any(m in c["modalities"] for c in cases)},
            "labelled": sum(bool(c.get("has_seg")) for c in cases),
            "held_out": {s: sorted(c["case_id"] for c in cases if c["split"] == s) for s in ("val", "test")},
        }
    return {"fingerprint": fingerprint(cache), "preparation": info["config"], "datasets": summary}
