"""Source contrast augmentation: the sources of a training slice, each raised to a random power.

Rule: with ``train.source_gamma = [low, high]``, every sequence the generator gets as a source is
raised, on the cache's [0, 1] scale, to a power drawn log-uniformly from ``[low, high]`` (one power per
slice and sequence, the same for its axial neighbours); the targets and the references of the losses
stay as stored. ``null`` (the default): no change.

Why: a scan from a site the model never saw differs from its training sites in the tissues' relative
contrast (sequence timing, field strength, vendor), which no per-volume rescaling undoes (the
preprocessing divides by the brain median; a power law moves grey against white against CSF). Seeing
its sources so changed, a model learns to read anatomy from the order of the tissues rather than from
one site's exact intensities, and still to draw the targets as the training sites show them. A power
law is the usual stand-in for such differences (nnU-Net's gamma augmentation);
``mmdiff evaluate --source-gamma`` makes the same change at test time
(:func:`mmdiff.evaluation.protocol.with_source_gamma`).

Measured (BENCHMARKS.md, session 19): 1500 steps with ``[0.7, 1.4]`` from the published GAN cost
0.2 dB on the held-out cases and bought no robustness (sources at gamma 0.8 cost it what they cost the
same run without it); the GAN already reads anatomy more than exact intensities. Hence off.

The powers are a function of ``(seed, step, process)``, so a resumed run draws the same ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def check_source_gamma(value) -> tuple[float, float] | None:
    """``train.source_gamma`` -> ``(low, high)`` with ``0 < low <= high``, or ``None`` for no change."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"train.source_gamma must be null or [low, high], got {value!r}")
    low, high = (float(v) for v in value)
    if not 0 < low <= high:
        raise ValueError(f"train.source_gamma [low, high] needs 0 < low <= high, got {value!r}")
    return low, high


def draw_gammas(bounds: tuple[float, float], shape: tuple[int, ...], seed: int, step: int,
                process: int = 0) -> torch.Tensor:
    """Powers ``[*shape]``, log-uniform in ``bounds``, a function of ``(seed, step, process)``."""
    low, high = bounds
    rng = np.random.default_rng([int(seed), int(step), int(process), 3])
    return torch.from_numpy(np.exp(rng.uniform(np.log(low), np.log(high), size=shape)).astype(np.float32))


def raise_to(images: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
    """``images [B, M, ...]`` on [0, 1], each ``(slice, sequence)`` raised to ``gammas [B, M]``."""
    gammas = gammas.to(images.device, images.dtype).reshape(*gammas.shape, *(1,) * (images.dim() - 2))
    return images.clamp(min=0) ** gammas
