"""A lossless, training-free latent: the orthonormal 2D Haar wavelet packet transform.

Each level splits every channel into its four 2 x 2 Haar sub-bands (LL, LH, HL, HH) at half the
resolution, so one level maps a ``H x W`` image to ``4 x H/2 x W/2`` and two levels to
``16 x H/4 x W/4`` (192 -> 96 x 96 x 4 or 48 x 48 x 16; the full packet, as in WDM / cWDM, so the
latent is one tensor). The transform is orthonormal: it keeps the L2 norm, its inverse is its
transpose, Gaussian noise in the latent is Gaussian noise of the same variance in the image, and
decoding is linear (``decode(a + b) = decode(a) + decode(b)``), which the residual diffusion relies on.

It is written here by hand in torch (a strided conv with four fixed 2 x 2 filters and its transposed
conv; a few lines), not taken from a wavelet library: nothing needs to be trained, downloaded or
installed, and the filters are a buffer, so the component saves and loads like any diffusers model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config


def _haar_filters() -> torch.Tensor:
    """The four orthonormal 2 x 2 Haar filters ``[4, 1, 2, 2]``: LL, LH, HL, HH (entries +-1/2)."""
    low = torch.tensor([1.0, 1.0])
    high = torch.tensor([1.0, -1.0])
    pairs = [(low, low), (low, high), (high, low), (high, high)]
    return torch.stack([torch.outer(a, b) / 2 for a, b in pairs])[:, None]


class HaarWavelet(ModelMixin, ConfigMixin):
    """Images ``[..., H, W]`` <-> latents ``[..., 4 ** levels, H / 2 ** levels, W / 2 ** levels]``.

    The same interface as mmdiff's use of ``AutoencoderKL`` (``encode``/``decode``, a
    ``latent_channels`` and a ``downsampling`` factor), but exact: ``decode(encode(x)) == x`` up to
    float rounding (~1e-7), with no training.

    Args:
        levels: 1 or 2 decomposition levels.
    """

    @register_to_config
    def __init__(self, levels: int = 2):
        super().__init__()
        if levels not in (1, 2):
            raise ValueError(f"levels must be 1 or 2, got {levels}")
        self.register_buffer("filters", _haar_filters())

    @property
    def latent_channels(self) -> int:
        return 4 ** self.config.levels

    @property
    def downsampling(self) -> int:
        return 2 ** self.config.levels

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[..., H, W]`` -> ``[..., 4 ** levels, h, w]``; ``H`` and ``W`` must be multiples of ``2 ** levels``."""
        *lead, height, width = images.shape
        if height % self.downsampling or width % self.downsampling:
            raise ValueError(f"image size {height}x{width} is not divisible by {self.downsampling}")
        x = images.reshape(-1, 1, height, width).to(self.filters.dtype)
        for _ in range(self.config.levels):
            channels = x.shape[1]
            x = F.conv2d(x.reshape(-1, 1, *x.shape[-2:]), self.filters, stride=2)  # [N*C, 4, h, w]
            x = x.reshape(-1, channels * 4, *x.shape[-2:])
        return x.reshape(*lead, *x.shape[1:])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`encode`: ``[..., 4 ** levels, h, w]`` -> ``[..., H, W]``."""
        *lead, channels, height, width = latents.shape
        if channels != self.latent_channels:
            raise ValueError(f"latents have {channels} channels, a {self.config.levels}-level Haar latent has "
                             f"{self.latent_channels}")
        x = latents.reshape(-1, channels, height, width).to(self.filters.dtype)
        for _ in range(self.config.levels):
            channels = x.shape[1] // 4
            x = F.conv_transpose2d(x.reshape(-1, 4, *x.shape[-2:]), self.filters, stride=2)  # [N*C, 1, 2h, 2w]
            x = x.reshape(-1, channels, *x.shape[-2:])
        return x.reshape(*lead, *x.shape[-2:])
