"""mmdiff's networks: PFM, the shared VAE, the conditional latent UNet, and the GAN fast path."""

from .gan import ModalityDiscriminators, MultiModalGenerator
from .pfm import NULL_DATASET_ID, DatasetEmbedding, FeatureModulation, drop_dataset_id
from .unet import ConditionalLatentUNet
from .vae import build_vae, decode_modalities, downsampling_factor, encode_modalities, measure_scaling_factor

__all__ = [
    "NULL_DATASET_ID",
    "ConditionalLatentUNet",
    "DatasetEmbedding",
    "FeatureModulation",
    "ModalityDiscriminators",
    "MultiModalGenerator",
    "build_vae",
    "decode_modalities",
    "downsampling_factor",
    "drop_dataset_id",
    "encode_modalities",
    "measure_scaling_factor",
]
