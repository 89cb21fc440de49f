"""A torch ``Dataset`` over a prepared slice cache (format: :mod:`mmdiff.data.cache`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .cache import BRAIN_MASK, IMAGES, SEG, CacheError, case_folder, dataset_id, read_index
from .sampler import group_keys

SPLITS = ("train", "val", "test")


class SliceDataset(Dataset):
    """Axial slices of a prepared cache, one sample per slice.

    Each item is a dict: ``images`` float32 ``[M, H, W]`` in [0, 1] (zeros where a modality is
    missing), ``available`` bool ``[M]``, ``dataset_id`` (position in ``cache.json``'s dataset list),
    ``brain_mask`` bool ``[H, W]``, ``seg`` uint8 ``[H, W]``, ``case_id`` and ``slice``. With
    ``crop`` set, each item is a random ``crop x crop`` window, a function of ``(seed, epoch, index)``
    (call :meth:`set_epoch` each epoch), so a resumed run sees the same crops with any number of workers.

    With ``context_slices = k > 0`` (a 2.5D model), items also hold ``context`` float32
    ``[M, 2k, H, W]``: the ``k`` stored slices below and above (order ``-k .. -1, +1 .. +k``), zeros
    beyond the case's ends, in the same crop window.

    With ``flip`` set, half the items (a function of ``(seed, epoch, index)``, like the crops) are
    mirrored left-right: every array of the item, context included, reversed along the first in-plane
    axis (left-right in the RAS+ cache that ``prepare`` writes). A brain's mirror image is a brain, so
    a model sees twice the anatomies of a small cohort (nnU-Net mirrors for the same reason); a slice's
    ``flipped`` flag says which way it came.

    ``modalities`` reorders or narrows the modality axis (a model trained on fewer sequences);
    ``datasets`` keeps only the named datasets; ``split`` is one of train/val/test or a list of them.
    Arrays are memory-mapped and opened lazily in each DataLoader worker.
    """

    def __init__(
        self,
        cache: str | os.PathLike,
        split: str | Sequence[str] | None = "train",
        datasets: Sequence[str] | None = None,
        modalities: Sequence[str] | None = None,
        crop: int | None = None,
        cases: Sequence[str] | None = None,
        seed: int = 0,
        context_slices: int = 0,
        flip: bool = False,
    ):
        self.cache = Path(cache)
        if context_slices < 0:
            raise CacheError(f"context_slices must be >= 0, got {context_slices}")
        self.context_slices = int(context_slices)
        self.flip = bool(flip)
        index = read_index(self.cache)
        self.dataset_names: list[str] = index["datasets"]
        cache_modalities: list[str] = index["modalities"]
        self.modalities = list(modalities) if modalities is not None else cache_modalities
        unknown = [m for m in self.modalities if m not in cache_modalities]
        if unknown:
            raise CacheError(f"modalities {unknown} are not in this cache (it has {cache_modalities})")
        if datasets is not None:
            missing = [d for d in datasets if d not in self.dataset_names]
            if missing:
                raise CacheError(f"datasets {missing} are not in this cache (it has {self.dataset_names})")
        splits = [split] if isinstance(split, str) else (list(split) if split is not None else list(SPLITS))
        bad = [s for s in splits if s not in SPLITS]
        if bad:
            raise CacheError(f"unknown split(s) {bad}: use {', '.join(SPLITS)}")
        self.size = int(index["size"])
        if crop is not None and not 0 < crop <= self.size:
            raise CacheError(f"crop {crop} must be in 1..{self.size}")
        self.crop = crop
        self.cases = [
            c for c in index["cases"]
            if c["split"] in splits
            and (datasets is None or c["dataset"] in datasets)
            and (cases is None or c["case_id"] in cases)
        ]
        self._rows = []  # per case: (positions of its stored modalities in self.modalities, availability)
        for case in self.cases:
            available = np.array([m in case["modalities"] for m in self.modalities], dtype=bool)
            stored = [case["modalities"].index(m) if m in case["modalities"] else -1 for m in self.modalities]
            self._rows.append((np.array(stored), available))
        counts = np.array([c["slices"] for c in self.cases], dtype=np.int64)
        self._case_of = np.repeat(np.arange(len(self.cases)), counts)
        self._slice_of = np.concatenate([np.arange(n) for n in counts]) if len(counts) else np.zeros(0, np.int64)
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select this epoch's random crops."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._case_of)

    @property
    def available(self) -> np.ndarray:
        """Availability ``[N, M]`` of every sample."""
        per_case = np.array([row[1] for row in self._rows], dtype=bool).reshape(-1, len(self.modalities))
        return per_case[self._case_of]

    @property
    def dataset_ids(self) -> np.ndarray:
        """Dataset id ``[N]`` of every sample (its position in the cache's dataset list)."""
        ids = np.array([dataset_id(self.dataset_names, c["dataset"]) for c in self.cases], dtype=np.int64)
        return ids[self._case_of]

    @property
    def groups(self) -> list[tuple[int, str]]:
        """Each sample's (dataset id, availability) key, for :class:`ModalityConsistentBatchSampler`."""
        return group_keys(self.dataset_ids, self.available)

    @property
    def lesion_slices(self) -> np.ndarray:
        """bool ``[N]``: the samples whose slice has a lesion label anywhere (``seg > 0``)."""
        flags = []
        for case_idx in range(len(self.cases)):
            seg = self._open(case_idx)[2]
            flags.append(np.asarray(seg).reshape(len(seg), -1).any(axis=1))
        return np.concatenate(flags) if flags else np.zeros(0, dtype=bool)

    def _open(self, case_idx: int):
        arrays = self._arrays.get(case_idx)
        if arrays is None:
            folder = case_folder(self.cache, self.cases[case_idx])
            arrays = tuple(np.load(folder / name, mmap_mode="r") for name in (IMAGES, BRAIN_MASK, SEG))
            self._arrays[case_idx] = arrays
        return arrays

    def __getitem__(self, i: int) -> dict:
        case_idx, k = int(self._case_of[i]), int(self._slice_of[i])
        images, brain, seg = self._open(case_idx)
        stored, available = self._rows[case_idx]
        window = self._window(i)
        out = np.zeros((len(self.modalities),) + self._shape(), dtype=np.float32)
        for j, s in enumerate(stored):
            if s >= 0:
                out[j] = images[k, s][window]
        case = self.cases[case_idx]
        arrays = {"images": out, "brain_mask": np.array(brain[k][window], dtype=bool),
                  "seg": np.array(seg[k][window], dtype=np.uint8)}
        if self.context_slices:
            offsets = [d for d in range(-self.context_slices, self.context_slices + 1) if d]
            context = np.zeros((len(self.modalities), len(offsets)) + self._shape(), dtype=np.float32)
            for n, d in enumerate(offsets):
                if 0 <= k + d < images.shape[0]:
                    for j, s in enumerate(stored):
                        if s >= 0:
                            context[j, n] = images[k + d, s][window]
            arrays["context"] = context
        flipped = self._flipped(i)
        if flipped:  # reversed along the first in-plane axis, copied: torch needs positive strides
            arrays = {key: np.ascontiguousarray(a[..., ::-1, :]) for key, a in arrays.items()}
        return {key: torch.from_numpy(a) for key, a in arrays.items()} | {
            "available": torch.from_numpy(available.copy()),
            "dataset_id": dataset_id(self.dataset_names, case["dataset"]),
            "case_id": case["case_id"],
            "slice": k,
            "flipped": flipped,
        }

    def _flipped(self, i: int) -> bool:
        """Whether item ``i`` is mirrored this epoch (its own stream: the crops do not move with it)."""
        return self.flip and bool(np.random.default_rng([self.seed, self.epoch, i, 1]).integers(2))

    def _shape(self) -> tuple[int, int]:
        return (self.crop, self.crop) if self.crop else (self.size, self.size)

    def _window(self, i: int) -> tuple[slice, slice]:
        if not self.crop or self.crop == self.size:
            return (slice(None), slice(None))
        y, x = np.random.default_rng([self.seed, self.epoch, i]).integers(0, self.size - self.crop + 1, size=2)
        return (slice(int(y), int(y) + self.crop), slice(int(x), int(x) + self.crop))

    def case_slices(self, case_id: str, dataset: str | None = None) -> list[int]:
        """Sample indices of one case's slices, in slice order."""
        found = [n for n, c in enumerate(self.cases)
                 if c["case_id"] == case_id and (dataset is None or c["dataset"] == dataset)]
        if not found:
            raise KeyError(f"case {case_id!r} is not in this dataset")
        return np.flatnonzero(self._case_of == found[0]).tolist()
