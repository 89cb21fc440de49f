"""Synthesis conditions and selective supervision.

A case has an availability mask ``m`` (True where the sequence exists). A synthesis condition picks
the *sources* ``sc`` among them (``sc_i = 0`` wherever ``m_i = 0``): the network sees
``x_i = y_i * sc_i`` and predicts every modality. The *targets* are the modalities a condition is
evaluated and supervised on; losses only count where ground truth exists: synthesis
``(1 - sc_i) * m_i``, reconstruction ``sc_i * m_i``.

Training modes (``k`` = number of available modalities; a condition is drawn uniformly from all
``(sources, targets)`` pairs the mode allows; with ``k = 1`` every mode gives sources = ``m`` and no
target, i.e. reconstruction only):

- ``"random"``: sources are any non-empty proper subset of the available set; targets are the rest.
- ``"one-to-one"``: one source, one target.
- ``"many-to-one"``: two or more sources, one target (one source when ``k = 2``).
- ``"all-but-one"``: every available modality but one is a source; that one is the target.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from ..modalities import MODALITIES, mask_key, parse_mask_key

MODES: tuple[str, ...] = ("random", "one-to-one", "many-to-one", "all-but-one")

Mask = np.ndarray | torch.Tensor


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown synthesis mode {mode!r}: choose one of {', '.join(MODES)}")


@lru_cache(maxsize=None)
def allowed_conditions(available_key: str, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Every ``(sources, targets)`` pair a mode allows for an availability mask key (``'110100'``).

    Returns two read-only bool arrays ``[K, M]``; row ``k`` of each is one condition.
    """
    _check_mode(mode)
    available = parse_mask_key(available_key)
    present = np.flatnonzero(available).tolist()
    if not present:
        raise ValueError("no modality is available: a synthesis condition needs at least one source")
    pairs = [(present, [])] if len(present) == 1 else []
    for n_sources in range(1, len(present)):
        for sources in itertools.combinations(present, n_sources):
            rest = [i for i in present if i not in sources]
            if mode == "random":
                pairs.append((sources, rest))
            elif mode == "all-but-one" and len(rest) == 1:
                pairs.append((sources, rest))
            elif (mode == "one-to-one" and n_sources == 1) or (
                mode == "many-to-one" and n_sources >= min(2, len(present) - 1)
            ):
                pairs.extend((sources, [target]) for target in rest)
    source_masks = np.zeros((len(pairs), len(available)), dtype=bool)
    target_masks = np.zeros_like(source_masks)
    for row, (sources, targets) in enumerate(pairs):
        source_masks[row, list(sources)] = True
        target_masks[row, targets] = True
    source_masks.setflags(write=False)
    target_masks.setflags(write=False)
    return source_masks, target_masks


class SynthesisConditionSampler:
    """Draws synthesis conditions ``(sources, targets)`` for availability masks.

    Args:
        mode: one of :data:`MODES` (see the module docstring).
        modalities: the modality list the masks follow.
        seed: seeds the sampler's own generator, used when a call passes none.
    """

    def __init__(self, mode: str = "random", modalities: Sequence[str] = MODALITIES, seed: int = 0):
        _check_mode(mode)
        self.mode = mode
        self.modalities = tuple(modalities)
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, available: Mask, generator: torch.Generator | None = None) -> tuple[Mask, Mask]:
        """``(sources, targets)`` for one availability mask ``[M]``, as the input's type (numpy or torch)."""
        sources, targets = self.batch(torch.as_tensor(available)[None], generator)
        if isinstance(available, torch.Tensor):
            return sources[0], targets[0]
        return sources[0].numpy(), targets[0].numpy()

    def batch(
        self, available: torch.Tensor, generator: torch.Generator | None = None, same_for_batch: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(sources, targets)``, bool ``[B, M]`` on ``available``'s device, for masks ``[B, M]``.

        With ``same_for_batch`` every sample gets the same condition (so the network can route its
        streams per batch); the masks of the batch must then all be equal, as MCBS batches are.
        """
        generator = self.generator if generator is None else generator
        available = torch.as_tensor(available)
        masks = available.to("cpu", torch.bool).numpy()
        if masks.ndim != 2 or masks.shape[1] != len(self.modalities):
            raise ValueError(
                f"availability has shape {tuple(masks.shape)}, expected [batch, {len(self.modalities)}]"
            )
        if same_for_batch:
            if not (masks == masks[:1]).all():
                raise ValueError(
                    "same_for_batch needs one availability mask for the whole batch, got "
                    + ", ".join(sorted({mask_key(m) for m in masks}))
                )
            masks = masks[:1]
        sources, targets = zip(*(self._draw(mask, generator) for mask in masks))
        sources, targets = torch.from_numpy(np.stack(sources)), torch.from_numpy(np.stack(targets))
        if same_for_batch:
            sources, targets = sources.expand(len(available), -1), targets.expand(len(available), -1)
        return sources.contiguous().to(available.device), targets.contiguous().to(available.device)

    def _draw(self, available: np.ndarray, generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        source_masks, target_masks = allowed_conditions(mask_key(available), self.mode)
        row = int(torch.randint(len(source_masks), (), generator=generator))
        return source_masks[row].copy(), target_masks[row].copy()


def loss_weights(
    available: torch.Tensor, sources: torch.Tensor, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selective supervision weights ``(synthesis, reconstruction)`` = ``((1 - sc) * m, sc * m)``.

    Both are zero wherever ground truth is missing.
    """
    available = torch.as_tensor(available, dtype=torch.bool)
    sources = torch.as_tensor(sources, dtype=torch.bool, device=available.device)
    return (~sources & available).to(dtype), (sources & available).to(dtype)
