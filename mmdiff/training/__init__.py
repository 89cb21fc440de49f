"""Training: one accelerate loop for the vae, ldm and gan stages, configs, safe checkpoints."""

from .config import ConfigError, load_config
from .trainer import train

__all__ = ["ConfigError", "load_config", "train"]
