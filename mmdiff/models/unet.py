"""The conditional latent UNet: any subset of modalities in, a prediction for every modality out.

Input channels, per latent pixel: the noisy latents of all ``M`` modalities (``M * C``), the clean
latents of the sources, zero elsewhere (``M * C``), and one source-mask plane per modality (``M``).
Conditioning: the PFM dataset embedding plus a learned embedding of the source mask, added to the
timestep embedding (``class_embed_type="identity"``); with ``resnet_time_scale_shift="scale_shift"``
every res block applies it as FiLM, ``norm(h) * (1 + scale) + shift``.

What the output means (noise, ``v`` or the clean sample) is the scheduler's ``prediction_type``;
the network does not know it, and the training code pairs them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from ..modalities import MODALITIES
from .pfm import check_dataset_names, DatasetEmbedding


class ConditionalLatentUNet(ModelMixin, ConfigMixin):
    """A ``diffusers.UNet2DModel`` over the stacked latents of all modalities, conditioned on the
    source mask and the dataset (PFM).

    Args:
        modalities: the modality list, in order (its length is ``M``).
        num_datasets: number of known datasets (id ``-1`` is the null dataset).
        dataset_names: the datasets' names in id order (stored so a pipeline can map names to ids);
            when given, ``num_datasets`` must be its length.
        latent_channels: VAE latent channels ``C``.
        sample_size: latent side length (informational; any size divisible by ``2 ** (blocks - 1)`` works).
        block_out_channels, layers_per_block, down_block_types, up_block_types, norm_num_groups,
        attention_head_dim, dropout: passed to ``UNet2DModel`` (``Attn*`` block types add attention);
            ``norm_num_groups`` defaults to the largest of 32, 16, 8, ... that divides every width.
    """

    @register_to_config
    def __init__(
        self,
        modalities: Sequence[str] = MODALITIES,
        num_datasets: int = 4,
        dataset_names: Sequence[str] | None = None,
        latent_channels: int = 4,
        sample_size: int = 48,
        block_out_channels: Sequence[int] = (64, 128, 256),
        layers_per_block: int = 2,
        down_block_types: Sequence[str] = ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types: Sequence[str] = ("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups: int | None = None,
        attention_head_dim: int = 32,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_dataset_names(num_datasets, dataset_names)
        num_modalities = len(modalities)
        embedding_dim = 4 * block_out_channels[0]  # UNet2DModel's time embedding size
        if norm_num_groups is None:
            norm_num_groups = math.gcd(32, *block_out_channels)
        self.unet = UNet2DModel(
            sample_size=sample_size,
            in_channels=2 * num_modalities * latent_channels + num_modalities,
            out_channels=num_modalities * latent_channels,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            norm_num_groups=norm_num_groups,
            attention_head_dim=attention_head_dim,
            dropout=dropout,
            class_embed_type="identity",
            resnet_time_scale_shift="scale_shift",
        )
        self.dataset_embedding = DatasetEmbedding(num_datasets, embedding_dim)
        self.source_mask_embedding = nn.Linear(num_modalities, embedding_dim)

    def forward(
        self,
        noisy_latents: torch.Tensor,
        timestep: torch.Tensor | float | int,
        source_latents: torch.Tensor,
        source_mask: torch.Tensor,
        dataset_id: torch.Tensor | int,
        return_dict: bool = True,
    ) -> UNet2DOutput | tuple[torch.Tensor]:
        """Predict for every modality.

        Args:
            noisy_latents: ``[B, M, C, h, w]``, the noisy latents of all modalities.
            timestep: scalar or ``[B]``.
            source_latents: ``[B, M, C, h, w]``, clean latents; non-sources are zeroed here, so passing
                the latents of every available modality is safe.
            source_mask: ``[B, M]``, bool or 0/1, True for the sources.
            dataset_id: ``[B]`` or an int; ``-1`` is the null (unseen-site) dataset.

        Returns:
            ``UNet2DOutput`` whose ``sample`` is ``[B, M, C, h, w]`` (a 1-tuple with ``return_dict=False``).
        """
        batch, num_modalities, channels, height, width = noisy_latents.shape
        if num_modalities != len(self.config.modalities) or channels != self.config.latent_channels:
            raise ValueError(
                f"latents have {num_modalities} modalities x {channels} channels, the model expects "
                f"{len(self.config.modalities)} x {self.config.latent_channels}"
            )
        mask = torch.as_tensor(source_mask, device=noisy_latents.device).to(noisy_latents.dtype)
        mask = mask.expand(batch, num_modalities)
        dataset_id = torch.as_tensor(dataset_id, device=noisy_latents.device).long().expand(batch)

        sources = source_latents * mask[:, :, None, None, None]
        mask_planes = mask[:, :, None, None].expand(batch, num_modalities, height, width)
        sample = torch.cat([noisy_latents.flatten(1, 2), sources.flatten(1, 2), mask_planes], dim=1)
        condition = self.dataset_embedding(dataset_id, noisy_latents.dtype) + self.source_mask_embedding(mask)

        prediction = self.unet(sample, timestep, class_labels=condition).sample
        prediction = prediction.reshape(batch, num_modalities, channels, height, width)
        if not return_dict:
            return (prediction,)
        return UNet2DOutput(sample=prediction)
