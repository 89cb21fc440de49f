"""The residual diffusion UNet and its loss (residual diffusion on a one-step predictor, as CorrDiff).

A deterministic predictor (the GAN generator, or the same network trained with the selective L1
losses only) gives the mean ``mu`` of every missing sequence; this UNet learns the residual
``y - mu`` in the latent (by default the lossless Haar wavelet), so it only has to model what the
predictor cannot know. Per latent pixel it sees:

- the noisy residual latents of all ``M`` modalities (``M * C`` channels; sources are zeroed);
- a condition latent per modality (``M * C``): the clean latent of the source where the modality is
  given, the predictor's mean ``mu`` where it is not;
- one source-mask plane per modality (``M``).

Timestep, dataset and availability mask are summed into one embedding that every conv block applies
through the same :class:`~mmdiff.models.pfm.FeatureModulation` (PFM) as the GAN generator (its
``ModulatedConvBlock``); ``use_pfm=False`` gives every sample the null dataset, as in the GAN's ablation.

The network predicts the clean residual (x0, diffusers' ``prediction_type="sample"``): few-step
image-to-image models with small networks train best on it. Its output layer is zero-initialised,
so an untrained UNet predicts a zero residual and the pipeline returns ``mu`` exactly: training can
only move away from the predictor where the data say so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.utils import BaseOutput
from torch import nn

from ..losses import latent_diffusion_loss
from ..modalities import MODALITIES
from .gan import ModulatedConvBlock
from .pfm import NULL_DATASET_ID, DatasetEmbedding, check_dataset_names


@dataclass
class UNet2DOutput(BaseOutput):
    """diffusers' ``UNet2DOutput`` (same field), defined here: importing it from ``diffusers.models.unets``
    imports every diffusers transformer, about a second of each synthesis command's start-up."""

    sample: torch.Tensor


class ModulatedResBlock(nn.Module):
    """Two PFM-modulated conv blocks (the GAN's ``ModulatedConvBlock``) plus a skip connection."""

    def __init__(self, in_channels: int, out_channels: int, embedding_dim: int, norm_num_groups: int):
        super().__init__()
        self.first = ModulatedConvBlock(in_channels, out_channels, embedding_dim, norm_num_groups)
        self.second = ModulatedConvBlock(out_channels, out_channels, embedding_dim, norm_num_groups)
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.second(self.first(x, embedding), embedding)


class ResidualUNet(ModelMixin, ConfigMixin):
    """Predicts the clean residual latent of every modality given its noisy version and the conditions.

    Args:
        modalities: the modality list, in order (its length is ``M``).
        num_datasets: number of known datasets (id ``-1`` is the null dataset).
        dataset_names: the datasets' names in id order; when given, ``num_datasets`` must be its length.
        latent_channels: latent channels ``C`` per modality (4 for a one-level Haar latent, 16 for two).
        block_out_channels: widths of the resolution levels, finest first (``len - 1`` downsamplings).
        layers_per_block: residual blocks per level, on the way down and on the way up.
        embedding_dim: size of the summed timestep + dataset + mask embedding that PFM reads.
        norm_num_groups: GroupNorm groups (must divide every width).
        residual_scale: residual latents are multiplied by this before diffusion (and divided after), so
            that they have about unit variance, the scale the noise schedule assumes; the training stage
            measures it on the data (the diffusers ``scaling_factor`` convention).
        use_pfm: if False (the PFM ablation), every sample gets the null dataset's embedding.
    """

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        num_datasets: int = 4,
        dataset_names: Sequence[str] | None = None,
        latent_channels: int = 16,
        block_out_channels: Sequence[int] = (64, 128, 192),
        layers_per_block: int = 1,
        embedding_dim: int = 128,
        norm_num_groups: int = 16,
        residual_scale: float = 1.0,
        use_pfm: bool = True,
    ):
        super().__init__()
        check_dataset_names(num_datasets, dataset_names)
        num_modalities = len(modalities)
        widths = list(block_out_channels)
        self.time_proj = Timesteps(widths[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(widths[0], embedding_dim)
        self.dataset_embedding = DatasetEmbedding(num_datasets, embedding_dim)
        self.mask_embedding = nn.Linear(num_modalities, embedding_dim)

        block = lambda i, o: ModulatedResBlock(i, o, embedding_dim, norm_num_groups)  # noqa: E731
        self.conv_in = nn.Conv2d(2 * num_modalities * latent_channels + num_modalities, widths[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        channels, skips = widths[0], []
        for level, width in enumerate(widths):
            blocks = nn.ModuleList()
            for _ in range(layers_per_block):
                blocks.append(block(channels, width))
                channels = width
            self.down.append(blocks)
            skips.append(channels)
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(channels, channels, 3, stride=2, padding=1))
        self.mid = block(channels, channels)
        self.up = nn.ModuleList()
        self.upsample = nn.Upsample(scale_factor=2, mode="nearest")
        for level in reversed(range(len(widths))):
            blocks = nn.ModuleList()
            for k in range(layers_per_block):
                blocks.append(block(channels + (skips[level] if k == 0 else 0), widths[level]))
                channels = widths[level]
            self.up.append(blocks)
        self.norm_out = nn.GroupNorm(norm_num_groups, channels)
        self.conv_out = nn.Conv2d(channels, num_modalities * latent_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)  # an untrained UNet predicts a zero residual: the pipeline returns mu
        nn.init.zeros_(self.conv_out.bias)

    @property
    def downsampling(self) -> int:
        """How much the UNet shrinks a latent side (latent sides must be multiples of it)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def embed(self, timestep, source_mask: torch.Tensor, dataset_id, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Timestep + dataset (PFM) + availability-mask embedding ``[B, embedding_dim]``, on the mask's
        device in ``dtype`` (the features' compute dtype; not read from a weight, which may be
        offloaded or stored in fp8)."""
        batch = source_mask.shape[0]
        device = source_mask.device
        dtype = dtype or torch.float32
        timestep = torch.as_tensor(timestep, device=device).reshape(-1).expand(batch)
        dataset_id = torch.as_tensor(dataset_id, device=device).long().reshape(-1).expand(batch)
        if not self.config.use_pfm:
            dataset_id = torch.full_like(dataset_id, NULL_DATASET_ID)
        time = self.time_embedding(self.time_proj(timestep).to(dtype))
        return time + self.dataset_embedding(dataset_id, dtype) + self.mask_embedding(source_mask.to(dtype))

    def forward(
        self,
        noisy_residual: torch.Tensor,
        timestep: torch.Tensor | float | int,
        condition: torch.Tensor,
        source_mask: torch.Tensor,
        dataset_id: torch.Tensor | int,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict the clean (scaled) residual latents.

        Args:
            noisy_residual: ``[B, M, C, h, w]`` noisy scaled residual latents (sources are zeroed here).
            timestep: scalar or ``[B]``, the training scheduler's timestep.
            condition: ``[B, M, C, h, w]``: source latents where given, the predictor's ``mu`` elsewhere.
            source_mask: ``[B, M]`` (or ``[M]``), bool or 0/1, True for the sources.
            dataset_id: ``[B]`` or an int; ``-1`` is the null (unseen-site) dataset.

        Returns:
            ``UNet2DOutput`` whose ``sample`` is ``[B, M, C, h, w]`` (a 1-tuple with ``return_dict=False``).
        """
        batch, num_modalities, channels, height, width = noisy_residual.shape
        if num_modalities != len(self.config.modalities) or channels != self.config.latent_channels:
            raise ValueError(f"latents have {num_modalities} modalities x {channels} channels, the model expects "
                             f"{len(self.config.modalities)} x {self.config.latent_channels}")
        if height % self.downsampling or width % self.downsampling:
            raise ValueError(f"latent size {height}x{width} is not divisible by {self.downsampling}")
        dtype = noisy_residual.dtype  # the compute dtype (the weights may be stored in another)
        mask = torch.as_tensor(source_mask, device=noisy_residual.device).to(dtype).expand(batch, num_modalities)
        noisy = noisy_residual * (1 - mask)[:, :, None, None, None]
        planes = mask[:, :, None, None].expand(batch, num_modalities, height, width)
        embedding = self.embed(timestep, mask, dataset_id, dtype)

        x = self.conv_in(torch.cat([noisy.flatten(1, 2), condition.to(dtype).flatten(1, 2), planes], dim=1))
        skips = []
        for level, blocks in enumerate(self.down):
            for block in blocks:
                x = block(x, embedding)
            skips.append(x)
            if level < len(self.downsample):
                x = self.downsample[level](x)
        x = self.mid(x, embedding)
        for k, blocks in enumerate(self.up):
            if k > 0:
                x = self.upsample(x)
            x = torch.cat([x, skips.pop()], dim=1)
            for block in blocks:
                x = block(x, embedding)
        out = self.conv_out(nn.functional.silu(self.norm_out(x)))
        out = out.reshape(batch, num_modalities, channels, height, width)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def diffusion_loss(
    unet: nn.Module,
    scheduler,
    residual: torch.Tensor,
    condition: torch.Tensor,
    source_mask: torch.Tensor,
    weight: torch.Tensor,
    dataset_id: torch.Tensor | int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The training loss of :class:`ResidualUNet`, k-diffusion style (the maths next to the model).

    Draws a timestep and noise per sample, noises the scaled clean residual with the training
    scheduler's ``add_noise``, and scores the UNet's clean-residual (x0) prediction by selective MSE:
    only (sample, modality) pairs with ``weight > 0`` count, i.e. synthesised sequences that have
    ground truth (selective supervision), so a missing sequence's placeholder never enters the loss.

    Args:
        unet: the UNet (or its DDP wrapper).
        scheduler: the training scheduler (``prediction_type="sample"``).
        residual: ``[B, M, C, h, w]`` unscaled residual latents ``latent(y) - latent(mu)``; entries
            with ``weight == 0`` are replaced by zeros (the model input there is pure noise).
        condition, source_mask, dataset_id: as for :meth:`ResidualUNet.forward`.
        weight: ``[B, M]`` loss weights, ``(1 - sc) * m``.
    """
    if scheduler.config.prediction_type != "sample":
        raise ValueError(f"the residual UNet predicts the clean sample; the scheduler says "
                         f"{scheduler.config.prediction_type!r}")
    scale = float(getattr(unet, "module", unet).config.residual_scale)
    scored = torch.as_tensor(weight, device=residual.device)[:, :, None, None, None] > 0
    # unscored residuals (no ground truth, or a source) are zero, whatever the placeholder held
    clean = torch.where(scored, residual * scale, torch.zeros_like(residual))
    batch, device = clean.shape[0], clean.device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator,
                      device="cpu" if generator is None else generator.device).to(device)
    noise = torch.randn(clean.shape, generator=generator, device="cpu" if generator is None else generator.device)
    noisy = scheduler.add_noise(clean, noise.to(device=device, dtype=clean.dtype), t)
    prediction = unet(noisy, t, condition, source_mask, dataset_id).sample
    return latent_diffusion_loss(prediction, clean, weight)
