"""How far off the predictor is likely to be, voxel by voxel: a learned error scale (heteroscedastic).

The rule: for every synthesised sequence the network predicts, per voxel, the scale ``b`` of a
Laplace distribution of the predictor's error ``e = y - mu``, and is trained by its negative
log-likelihood (Kendall & Gal 2017, "What uncertainties do we need", with a Laplace in place of a
Gaussian, as the predictor is trained with L1)::

    NLL = |e| / b + log b        (minimised at b = E|e| given what the network sees)

Why: the diffusion samples' spread is the other estimate of the uncertainty, but a few samples of a
UNet trained for a few thousand CPU steps rank the errors poorly (Spearman 0.18 with |error| on
held-out cases, BENCHMARKS.md session 11), while where the predictor errs is largely predictable from
what it is given: edges, CSF, lesions, the sequence asked for and the site. A few-layer network sees
exactly that: the conditioning images (the sources where given, ``mu`` where not), which sequences are
sources, and the dataset (a learned offset of ``log b`` per dataset and sequence). Its output layer is
zero-initialised, so an untrained model states one constant scale everywhere.

The pipeline combines ``b`` with the samples' spread and calibrates the result like any spread
(:func:`mmdiff.pipelines.ldm.combined_spread`): the scale fitted on validation slices makes the
stated interval cover the stated fraction of voxels whatever ``b``'s own level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from ..losses import _selective_mean
from ..modalities import MODALITIES
from .pfm import NULL_DATASET_ID, DatasetEmbedding, FeatureModulation, check_dataset_names

#: the scale is kept in [exp(LOG_SCALE_MIN), exp(LOG_SCALE_MAX)] ([-1, 1] units): exact zeros (a
#: background voxel) would otherwise drive ``log b`` to minus infinity
LOG_SCALE_MIN, LOG_SCALE_MAX = -7.0, 1.0


class ErrorScaleNet(ModelMixin, ConfigMixin):
    """Per-voxel Laplace scale ``log b`` of the predictor's error, for every sequence.

    Args:
        modalities: the modality list, in order (``M``).
        num_datasets: known datasets (id ``-1`` is the null dataset, with an offset of its own).
        dataset_names: the datasets' names in id order.
        channels: width of the conv layers.
        num_layers: 3 x 3 conv layers at half resolution (dilations 1, 2, 4, ...: the receptive field
            grows to tens of pixels at a few MFLOP per layer).
        init_scale: the constant scale an untrained model states ([-1, 1] units).
        use_pfm: modulate every conv layer's features by the dataset embedding (PFM, as the GAN and the
            UNet; zero-initialised, so a model without it loads and starts unchanged). Without it the
            dataset only shifts ``log b`` by a constant, and a site whose lesions the predictor misses
            (WML FLAIR from T2) cannot have its own idea of where the errors are. Measured: no gain in
            held-out (lesion) coverage over the plain model (BENCHMARKS.md, session 14), so off by default.
        embedding_dim: the dataset embedding's size (with ``use_pfm``).
    """

    @register_to_config
    def __init__(self, modalities: Sequence[str] = MODALITIES, num_datasets: int = 4,
                 dataset_names: Sequence[str] | None = None, channels: int = 32, num_layers: int = 4,
                 init_scale: float = 0.05, use_pfm: bool = False, embedding_dim: int = 32):
        super().__init__()
        check_dataset_names(num_datasets, dataset_names)
        m = len(modalities)
        self.conv_in = nn.Conv2d(2 * m, channels, 3, padding=1)
        self.down = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.body = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=2 ** (k % 4), dilation=2 ** (k % 4))
                                  for k in range(num_layers))
        self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
        self.conv_out = nn.Conv2d(2 * channels, m, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # untrained: one constant scale everywhere
        nn.init.constant_(self.conv_out.bias, math.log(init_scale))
        self.dataset_offset = nn.Embedding(num_datasets + 1, m)  # index num_datasets: the null dataset
        nn.init.zeros_(self.dataset_offset.weight)
        if use_pfm:  # one modulation for the full-resolution features, one per body layer
            self.dataset_embedding = DatasetEmbedding(num_datasets, embedding_dim)
            self.modulation = nn.ModuleList(FeatureModulation(embedding_dim, channels) for _ in range(num_layers + 1))

    def forward(self, condition: torch.Tensor, source_mask: torch.Tensor, dataset_id: torch.Tensor | int
                ) -> torch.Tensor:
        """``log b`` ``[B, M, H, W]`` (clamped, see :data:`LOG_SCALE_MIN`).

        Args:
            condition: ``[B, M, H, W]`` in [-1, 1]: each source where given, the predictor's ``mu`` elsewhere.
            source_mask: ``[B, M]`` (or ``[M]``), True for the sources.
            dataset_id: an int or ``[B]`` (``-1``: null).
        """
        batch, m, height, width = condition.shape
        if m != len(self.config.modalities):
            raise ValueError(f"{m} channels, the model knows {len(self.config.modalities)} modalities")
        if height % 2 or width % 2:
            raise ValueError(f"slice sides must be even, got {height}x{width}")
        dtype = condition.dtype
        mask = torch.as_tensor(source_mask, device=condition.device).to(dtype).expand(batch, m)
        planes = mask[:, :, None, None].expand(batch, m, height, width)
        ids = torch.as_tensor(dataset_id, device=condition.device).long().reshape(-1).expand(batch)
        if self.config.use_pfm:
            embedding = self.dataset_embedding(ids, dtype)
            modulate = lambda k, features: self.modulation[k](features, embedding)  # noqa: E731
        else:
            modulate = lambda k, features: features  # noqa: E731
        full = nn.functional.silu(modulate(0, self.conv_in(torch.cat([condition, planes], dim=1))))
        x = nn.functional.silu(self.down(full))
        for k, conv in enumerate(self.body, start=1):
            x = x + nn.functional.silu(modulate(k, conv(x)))
        log_scale = self.conv_out(torch.cat([full, self.up(x)], dim=1))
        ids = torch.where(ids == NULL_DATASET_ID, self.config.num_datasets, ids)
        log_scale = log_scale + self.dataset_offset(ids).to(dtype)[:, :, None, None]
        return log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)


def laplace_nll(log_scale: torch.Tensor, error: torch.Tensor, weight: torch.Tensor,
                pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(|e| / b + log b)`` over the (sample, modality) pairs with ``weight > 0`` (synthesised
    sequences with ground truth: selective supervision), each pair's mean over its pixels weighted by
    ``pixel_weight`` ``[B, H, W]`` (the brain mask: where the calibration and the evaluation look)."""
    return _selective_mean(lambda s, e: e.abs() * torch.exp(-s) + s, log_scale, error, weight, pixel_weight)
