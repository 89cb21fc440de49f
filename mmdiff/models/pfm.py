"""Personalized Feature Modulation (PFM), after PMM-Synth.

A dataset identifier ``n`` is encoded sinusoidally and passed through an MLP to a dataset embedding;
every conv block turns that embedding into a scale and shift, ``F * (1 + gamma) + beta``. A null
identifier (``NULL_DATASET_ID = -1``) has its own embedding and serves scans from unseen sites; training
learns it by dropping identifiers to null with some probability (:func:`drop_dataset_id`).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

NULL_DATASET_ID = -1


class DatasetEmbedding(nn.Module):
    """Dataset id ``[B]`` (ints in ``0..num_datasets-1``, or ``-1`` for null) -> embedding ``[B, embedding_dim]``.

    Args:
        num_datasets: number of known datasets; the null id is stored at index ``num_datasets``.
        embedding_dim: size of the embedding.
        sinusoidal_dim: size of the sinusoidal encoding of the id fed to the MLP.
    """

    def __init__(self, num_datasets: int, embedding_dim: int, sinusoidal_dim: int = 64):
        super().__init__()
        if num_datasets < 1:
            raise ValueError(f"num_datasets must be at least 1, got {num_datasets}")
        self.num_datasets = num_datasets
        self.sinusoid = Timesteps(sinusoidal_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.mlp = TimestepEmbedding(sinusoidal_dim, embedding_dim)

    def forward(self, dataset_id: torch.Tensor | int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``dataset_id``: an int or ``[B]``, on the device the features are on (it is not moved, so
        the embedding works with offloaded or meta weights); ``dtype``: the features' compute dtype
        (default: float32), which is not necessarily the weights' storage dtype (layerwise casting
        stores them in fp8)."""
        dataset_id = torch.as_tensor(dataset_id).long().reshape(-1)
        if dataset_id.device.type == "cpu":  # a check that needs no device sync
            bad = (dataset_id < NULL_DATASET_ID) | (dataset_id >= self.num_datasets)
            if bad.any():
                raise ValueError(
                    f"dataset ids must lie in 0..{self.num_datasets - 1} or be {NULL_DATASET_ID} (null), "
                    f"got {sorted(set(dataset_id.tolist()))}"
                )
        index = torch.where(dataset_id == NULL_DATASET_ID, self.num_datasets, dataset_id)
        return self.mlp(self.sinusoid(index).to(dtype or torch.float32))


class FeatureModulation(nn.Module):
    """``F * (1 + gamma) + beta`` with ``(gamma, beta)`` from the dataset embedding.

    The projection is zero-initialised, so a fresh block is the identity.
    """

    def __init__(self, embedding_dim: int, channels: int):
        super().__init__()
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(embedding_dim, 2 * channels))
        nn.init.zeros_(self.to_scale_shift[1].weight)
        nn.init.zeros_(self.to_scale_shift[1].bias)

    def forward(self, features: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.to_scale_shift(embedding)[:, :, None, None].chunk(2, dim=1)
        return features * (1 + gamma) + beta


def drop_dataset_id(
    dataset_id: torch.Tensor, p: float, generator: torch.Generator | None = None, only=None
) -> torch.Tensor:
    """Replace each id by the null id (``-1``) with probability ``p`` (for training the null embedding).

    ``only``: the ids that may be dropped (the others are kept), so the null embedding learns what those
    datasets share (e.g. the real cohorts, not simulated ones); ``None``: every id. The random draw is
    the same either way."""
    dataset_id = torch.as_tensor(dataset_id)
    if p <= 0:
        return dataset_id
    device = generator.device if generator is not None else dataset_id.device
    drop = torch.rand(dataset_id.shape, generator=generator, device=device).to(dataset_id.device) < p
    if only is not None:
        drop &= torch.isin(dataset_id, torch.as_tensor(list(only), dtype=dataset_id.dtype, device=dataset_id.device))
    return torch.where(drop, torch.full_like(dataset_id, NULL_DATASET_ID), dataset_id)


def check_dataset_names(num_datasets: int, dataset_names) -> None:
    """A model's ``dataset_names`` (if any) must name each of its ``num_datasets`` ids once."""
    if dataset_names is None:
        return
    if len(dataset_names) != num_datasets or len(set(dataset_names)) != len(dataset_names):
        raise ValueError(f"dataset_names {list(dataset_names)} must be {num_datasets} distinct names")
