"""The Modality-Consistent Batch Scheduler (MCBS) of PMM-Synth.

Samples are grouped by ``(dataset id, availability mask)``. Each group is padded to a multiple of the
batch size by duplicating random members of the same group, cut into batches, and the batches of all
groups are shuffled together. Every batch is therefore homogeneous (one dataset, one set of present
modalities), so a network can route its streams per batch and train at batch sizes above 1.

Use it as ``DataLoader(dataset, batch_sampler=sampler)``. Under ``accelerator.prepare`` accelerate
wraps it in ``BatchSamplerShard``, which hands whole batches to the processes round-robin (keep
``even_batches=True``), so batches stay homogeneous. Call ``sampler.set_epoch(epoch)`` yourself at
the start of every epoch: accelerate's ``dataloader.set_epoch`` does not reach a custom batch sampler.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Sequence

import numpy as np
from torch.utils.data import Sampler

from ..modalities import mask_key


def group_keys(
    dataset_ids: Sequence[int] | np.ndarray, available_masks: Sequence[Sequence[bool]] | np.ndarray
) -> list[tuple[int, str]]:
    """Group key ``(dataset_id, mask_key)`` of every sample, e.g. ``(2, "110100")``."""
    if len(dataset_ids) != len(available_masks):
        raise ValueError(
            f"{len(dataset_ids)} dataset ids but {len(available_masks)} availability masks"
        )
    return [(int(d), mask_key(m)) for d, m in zip(dataset_ids, available_masks)]


# Written by hand: neither torch nor accelerate has a grouped, padded batch sampler.
class ModalityConsistentBatchSampler(Sampler[list[int]]):
    """Yields full, homogeneous batches of dataset indices: every batch comes from one group.

    Args:
        groups: the group key of every sample (any hashable; see :func:`group_keys`).
        batch_size: samples per batch; every batch has exactly this many.
        seed: with the epoch, fixes the order; the same ``(seed, epoch)`` gives the same batches.
        shuffle: if False (validation), groups come in sorted key order, members in index order, and
            a group is padded by repeating its first members.
        repeats: how many times each sample comes per epoch (default once). Oversampling rare but
            important samples, e.g. the slices with a lesion (``data.lesion_oversample``), as nnU-Net
            oversamples patches with foreground: a few percent of the pixels are the lesion, and a
            network trained on plain epochs learns to draw normal tissue over it. Batches stay
            homogeneous: a repeat stays in its sample's group.
    """

    def __init__(self, groups: Sequence[Hashable], batch_size: int, seed: int = 0, shuffle: bool = True,
                 repeats: Sequence[int] | np.ndarray | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if len(groups) == 0:
            raise ValueError("no samples to batch: groups is empty")
        if repeats is not None:
            repeats = np.asarray(repeats, dtype=np.int64)
            if repeats.shape != (len(groups),) or (repeats < 1).any():
                raise ValueError(f"repeats needs one count >= 1 per sample ({len(groups)})")
        members: dict[Hashable, list[int]] = {}
        for i, key in enumerate(groups):
            members.setdefault(key, []).extend([i] * (1 if repeats is None else int(repeats[i])))
        try:
            keys = sorted(members)
        except TypeError:  # keys of mixed types: keep the order of first appearance
            keys = list(members)
        self.groups = {key: np.asarray(members[key], dtype=np.int64) for key in keys}
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of this epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return sum(math.ceil(len(m) / self.batch_size) for m in self.groups.values())

    def __iter__(self) -> Iterator[list[int]]:
        rng = np.random.default_rng([self.seed, self.epoch]) if self.shuffle else None
        batches = []
        for members in self.groups.values():
            padded = self._pad(members, rng)
            batches.extend(padded.reshape(-1, self.batch_size))
        order = rng.permutation(len(batches)) if self.shuffle else range(len(batches))
        for i in order:
            yield batches[i].tolist()

    def _pad(self, members: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        """The group's members plus duplicates of its own members up to a multiple of the batch size,
        shuffled when ``rng`` is given."""
        missing = -len(members) % self.batch_size
        rounds = math.ceil(missing / len(members))  # a group smaller than a batch repeats
        if rng is None:
            return np.concatenate([members, np.tile(members, rounds)[:missing]])
        # every round draws each member once, so the duplicates spread over the whole group
        extra = [rng.permutation(members) for _ in range(rounds)]
        return rng.permutation(np.concatenate([members, *extra])[: len(members) + missing])
