"""The latent of the diffusion engine: the lossless Haar wavelet (:class:`~mmdiff.models.wavelet.HaarWavelet`,
the default) or one learned single-channel ``diffusers.AutoencoderKL`` shared by all modalities
(a config choice for GPU-scale training). The helpers here take either.

Each modality of a ``[B, M, H, W]`` stack is encoded as its own one-channel image, so latents are
``[B, M, C, h, w]``. Latents the diffusion model sees are ``(z - shift_factor) * scaling_factor``
(the diffusers convention); the training code measures the scaling factor once the VAE is trained
(:func:`measure_scaling_factor`) and stores it with ``vae.register_to_config(scaling_factor=...)``.
For whole volumes, ``vae.enable_slicing()`` encodes and decodes one image at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import torch

from .wavelet import HaarWavelet

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

    Latent = AutoencoderKL | HaarWavelet
else:
    # what diffusers checks a pipeline's ``vae`` against at load time. AutoencoderKL is imported only
    # where one is built or loaded: its module imports every diffusers transformer (about a second of
    # each synthesis command's start-up), which the default Haar latent never needs.
    Latent = torch.nn.Module


def build_vae(
    block_out_channels: Sequence[int] = (32, 64, 128),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int | None = None,
    mid_block_add_attention: bool = True,
    sample_size: int = 192,
) -> AutoencoderKL:
    """A single-channel AutoencoderKL; ``n`` blocks downsample by ``2 ** (n - 1)`` (3 blocks: /4).

    ``norm_num_groups`` defaults to the largest of 32, 16, 8, ... that divides every block width.
    The scaling factor starts at 1 until :func:`measure_scaling_factor` sets it.
    """
    block_out_channels = tuple(int(c) for c in block_out_channels)
    if norm_num_groups is None:
        norm_num_groups = math.gcd(32, *block_out_channels)
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * len(block_out_channels),
        up_block_types=("UpDecoderBlock2D",) * len(block_out_channels),
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=latent_channels,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
        scaling_factor=1.0,
        mid_block_add_attention=mid_block_add_attention,
    )


def downsampling_factor(vae: Latent) -> int:
    """How much the latent shrinks each spatial side."""
    if isinstance(vae, HaarWavelet):
        return vae.downsampling
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_channels(vae: Latent) -> int:
    """Latent channels per modality."""
    return vae.latent_channels if isinstance(vae, HaarWavelet) else vae.config.latent_channels


def _shift(vae: AutoencoderKL) -> float:
    return vae.config.shift_factor or 0.0


def encode_modalities(
    vae: Latent, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Images ``[B, M, H, W]`` in [-1, 1] -> scaled latents ``[B, M, C, h, w]``.

    The wavelet is exact and deterministic; the VAE uses the posterior mode, or a posterior sample
    with ``sample=True``.
    """
    if isinstance(vae, HaarWavelet):
        return vae.encode(images)
    batch, modalities, height, width = images.shape
    flat = images.reshape(batch * modalities, 1, height, width).to(vae.dtype)
    posterior = vae.encode(flat).latent_dist
    latents = posterior.sample(generator) if sample else posterior.mode()
    latents = (latents - _shift(vae)) * vae.config.scaling_factor
    return latents.reshape(batch, modalities, *latents.shape[1:])


def decode_modalities(vae: Latent, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents ``[B, M, C, h, w]`` -> images ``[B, M, H, W]`` (not clamped)."""
    if isinstance(vae, HaarWavelet):
        return vae.decode(latents)
    batch, modalities = latents.shape[:2]
    flat = latents.flatten(0, 1).to(vae.dtype) / vae.config.scaling_factor + _shift(vae)
    images = vae.decode(flat).sample
    return images.reshape(batch, modalities, *images.shape[-2:])


@torch.no_grad()
def measure_scaling_factor(
    vae: AutoencoderKL, batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]
) -> float:
    """``1 / std`` of the unscaled, unshifted latents (posterior mode) over ``batches``.

    Each item is images ``[B, M, H, W]`` or a pair ``(images, available[B, M])``; with the pair only
    the available modalities count, so zero-filled missing sequences do not bias the estimate.
    """
    total, total_sq, count = 0.0, 0.0, 0
    for item in batches:
        images, available = item if isinstance(item, (tuple, list)) else (item, None)
        batch, modalities, height, width = images.shape
        flat = images.reshape(batch * modalities, 1, height, width)
        if available is not None:
            flat = flat[torch.as_tensor(available, dtype=torch.bool, device=flat.device).reshape(-1)]
        if len(flat) == 0:
            continue
        latents = vae.encode(flat.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode().double()
        total += latents.sum().item()
        total_sq += latents.square().sum().item()
        count += latents.numel()
    if count == 0:
        raise ValueError("no images to measure the latent scale on")
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    if std == 0:
        raise ValueError("the latents have zero variance: is the VAE trained, and are the images non-constant?")
    return 1.0 / std
