"""PSNR, SSIM and MAE of 2D slices, over the whole image or inside a mask (the brain, a lesion).

Inputs are ``[N, H, W]`` tensors in the same units (mmdiff's [0, 1] by default, ``data_range=1``).
``pooled=False`` gives one value per slice; ``pooled=True`` one value over all masked pixels of the
N slices (a volume's slices give its per-volume score). Whole-image SSIM is inflated by the empty
background, so lead with the masked numbers. SSIM uses MONAI's SSIM map (Gaussian window 11,
sigma 1.5); the masked mean of that map is computed here because MONAI only averages whole images.
"""

from __future__ import annotations

import torch
from monai.metrics.regression import compute_ssim_and_cs

KERNEL_SIZE = 11
KERNEL_SIGMA = 1.5


def _prepare(pred, target, mask):
    pred = torch.as_tensor(pred, dtype=torch.float32)
    target = torch.as_tensor(target, dtype=torch.float32, device=pred.device)
    if pred.shape != target.shape or pred.dim() != 3:
        raise ValueError(f"pred and target must both be [N, H, W]; got {tuple(pred.shape)} and {tuple(target.shape)}")
    if mask is None:
        mask = torch.ones_like(pred, dtype=torch.bool)
    mask = torch.as_tensor(mask, device=pred.device).bool().expand_as(pred)
    return pred, target, mask


def _masked_mean(values: torch.Tensor, mask: torch.Tensor, pooled: bool) -> torch.Tensor:
    values = values * mask
    if pooled:
        return values.sum() / mask.sum().clamp_min(1)
    return values.flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)


def mae(pred, target, mask=None, pooled: bool = False) -> torch.Tensor:
    """Mean absolute error inside ``mask``."""
    pred, target, mask = _prepare(pred, target, mask)
    return _masked_mean((pred - target).abs(), mask, pooled)


def psnr(pred, target, mask=None, data_range: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, ``10 log10(range^2 / MSE)``, with the MSE inside ``mask``."""
    pred, target, mask = _prepare(pred, target, mask)
    mse = _masked_mean((pred - target) ** 2, mask, pooled)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def ssim_map(pred, target, data_range: float = 1.0) -> torch.Tensor:
    """MONAI's SSIM map of ``[N, H, W]`` slices: ``[N, H - 10, W - 10]`` (valid Gaussian window)."""
    pred, target, _ = _prepare(pred, target, None)
    values, _ = compute_ssim_and_cs(pred[:, None], target[:, None], spatial_dims=2,
                                    kernel_size=(KERNEL_SIZE,) * 2, kernel_sigma=(KERNEL_SIGMA,) * 2,
                                    data_range=data_range)
    return values[:, 0]


def masked_ssim(values: torch.Tensor, mask, pooled: bool = False) -> torch.Tensor:
    """The mean of an :func:`ssim_map` inside ``mask`` ``[N, H, W]`` (cropped like the map)."""
    border = KERNEL_SIZE // 2
    mask = torch.as_tensor(mask).bool()[:, border:-border, border:-border]
    return _masked_mean(values, mask.expand_as(values), pooled)


def ssim(pred, target, mask=None, data_range: float = 1.0, pooled: bool = False) -> torch.Tensor:
    """Structural similarity: MONAI's SSIM map averaged inside ``mask`` (map and mask cropped alike)."""
    pred, target, mask = _prepare(pred, target, mask)
    return masked_ssim(ssim_map(pred, target, data_range), mask, pooled)
