"""mmdiff's networks: PFM, the latents (Haar wavelet, VAE), the residual diffusion UNet, the learned error
scale, and the GAN."""

from .error_scale import ErrorScaleNet, laplace_nll
from .gan import ModalityDiscriminators, MultiModalGenerator
from .pfm import NULL_DATASET_ID, DatasetEmbedding, FeatureModulation, drop_dataset_id
from .unet import ResidualUNet, diffusion_loss
from .vae import (build_vae, decode_modalities, downsampling_factor, encode_modalities, latent_channels,
                  measure_scaling_factor)
from .wavelet import HaarWavelet

__all__ = [
    "NULL_DATASET_ID",
    "DatasetEmbedding",
    "ErrorScaleNet",
    "FeatureModulation",
    "HaarWavelet",
    "ModalityDiscriminators",
    "MultiModalGenerator",
    "ResidualUNet",
    "build_vae",
    "decode_modalities",
    "diffusion_loss",
    "downsampling_factor",
    "drop_dataset_id",
    "encode_modalities",
    "laplace_nll",
    "latent_channels",
    "measure_scaling_factor",
]
