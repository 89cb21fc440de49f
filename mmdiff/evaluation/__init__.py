"""Evaluation: image-quality metrics (brain-masked first), protocols and reports."""

from .metrics import mae, psnr, ssim

__all__ = ["mae", "psnr", "ssim"]
