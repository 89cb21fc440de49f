"""Losses with selective supervision: terms only count where ground truth exists.

Weights are per (sample, modality), ``[B, M]``: for synthesis ``(1 - sc) * m`` and for reconstruction
``sc * m`` (:func:`mmdiff.data.conditions.loss_weights`). Entries with weight 0 are never read, so a
missing modality's placeholder (zeros, NaN, anything) gives exactly zero loss and zero gradient.

GAN terms follow PMM-Synth (eqs 5-9): ``lambda_syn = 100``, ``lambda_rec = 30``, ``lambda_adv = 1``,
least-squares GAN. The VAE loss is L1 + (1 - SSIM) + KL, with a gated adversarial term.
Composite losses return dicts of named terms (``"loss"`` is the one to backpropagate).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

Logits = torch.Tensor | Mapping[int, torch.Tensor]


@functools.cache
def _patch_lsgan_loss():
    """MONAI's least-squares patch loss, built on first use: MONAI takes seconds to import, and
    synthesis (which imports the models, and through them this module) never needs it."""
    from monai.losses import PatchAdversarialLoss

    return PatchAdversarialLoss(criterion="least_squares", reduction="none", no_activation_leastsq=True)


def _patch_lsgan(*args, **kwargs):
    return _patch_lsgan_loss()(*args, **kwargs)


def _selective_mean(
    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    pred: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    pixel_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_{b,m} w[b,m] * mean(error(pred[b,m], target[b,m])) / sum_{b,m} w[b,m]``, reading only ``w > 0``.

    With ``pixel_weight`` ``[B, H, W]`` (or ``[B, ...]`` like one image), each item's mean is the
    ``pixel_weight``-weighted mean over its pixels.
    """
    weight = torch.as_tensor(weight, device=pred.device).to(pred.dtype)
    if weight.shape != pred.shape[:2]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match pred {tuple(pred.shape)} in [B, M]")
    selected = weight > 0
    if not selected.any():
        return pred.sum() * 0.0
    errors = error(pred[selected], target[selected]).flatten(1)
    if pixel_weight is None:
        per_item = errors.mean(1)
    else:
        pixels = pixel_weight.to(pred.dtype)[:, None].expand(*pred.shape[:2], *pixel_weight.shape[1:])
        pixels = pixels[selected].flatten(1)
        per_item = (errors * pixels).sum(1) / pixels.sum(1).clamp_min(1e-8)
    return (per_item * weight[selected]).sum() / weight[selected].sum()


def selective_l1(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                 pixel_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean absolute error over the (sample, modality) pairs with weight > 0; ``pred``, ``target``: ``[B, M, ...]``;
    ``pixel_weight`` ``[B, ...]`` weights the pixels of each image (see :func:`lesion_pixel_weight`)."""
    return _selective_mean(lambda p, t: (p - t).abs(), pred, target, weight, pixel_weight)


def selective_ssim_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor,
                        mask: torch.Tensor | None = None, data_range: float = 2.0) -> torch.Tensor:
    """``1 - SSIM`` over the (sample, modality) pairs with weight > 0, ``pred``, ``target``: ``[B, M, H, W]``.

    The SSIM map is the evaluation's own (:func:`mmdiff.evaluation.metrics.ssim_map`: MONAI's, Gaussian
    window 11, valid part only), averaged inside ``mask`` ``[B, H, W]`` (the brain; cropped like the
    map) as the evaluation scores it. L1 is blind to where an error sits; SSIM scores local means,
    contrasts and structure (the correlation of each 11 x 11 window), so it pays for a blurred edge
    or a flattened texture that L1 hardly sees (Zhao et al., "Loss functions for image restoration
    with neural networks", 2017: L1 plus SSIM trains better images than either alone).
    """
    from .evaluation.metrics import KERNEL_SIZE, ssim_map  # MONAI, imported on first use (see above)

    border = KERNEL_SIZE // 2
    inside = None if mask is None else mask[..., border:-border, border:-border]
    return _selective_mean(lambda p, t: 1 - ssim_map(p, t, data_range), pred, target, weight, inside)


def lesion_pixel_weight(seg: torch.Tensor, lesion_weight: float | Mapping[int, float]) -> torch.Tensor:
    """``1 + lesion_weight`` on lesion pixels (``seg > 0``), 1 elsewhere: ``[B, H, W]``.

    A lesion is a few percent of a slice's pixels and most of what a reader looks at; with plain L1 a
    network that draws normal tissue over the lesion loses little (a T1C without enhancement, a FLAIR
    with a dark tumour core). Weighting lesion pixels makes those errors count.

    ``lesion_weight`` may also map seg labels to their own extra weight (``{1: 4, 2: 4, 3: 16}``:
    BraTS' enhancing tumour, label 3, counts 17x), for a lesion part that is both small and the one
    thing a sequence shows (enhancement in T1C); labels it does not name get no extra weight.
    """
    if not isinstance(lesion_weight, Mapping):
        return 1.0 + float(lesion_weight) * (seg > 0).float()
    weight = torch.ones(seg.shape, dtype=torch.float32, device=seg.device)
    for label, extra in lesion_weight.items():
        weight = weight + float(extra) * (seg == int(label)).float()
    return weight


def dataset_lesion_pixel_weight(seg: torch.Tensor, dataset_ids: torch.Tensor,
                                lesion_weight: float | Mapping[int, float],
                                by_dataset: Mapping[int, float | Mapping[int, float]]) -> torch.Tensor | None:
    """:func:`lesion_pixel_weight` with each image's own dataset's weights: ``by_dataset[id]`` where the
    image's dataset (``dataset_ids`` ``[B]``) is named there, ``lesion_weight`` otherwise; None where
    no image gets any extra weight.

    Why per dataset: a label means what its cohort's masks mean. Label 1 is the necrotic core of a
    glioma in BraTS and the whole lesion in the MS and white-matter-lesion cohorts, so one weight for
    label 1 cannot darken a glioma's core in T1C without over-drawing the white-matter lesions in
    FLAIR (BENCHMARKS.md, sessions 20-21).
    """
    weight, dataset_ids = None, dataset_ids.to(seg.device)
    for dataset in dataset_ids.unique().tolist():
        extra = by_dataset.get(int(dataset), lesion_weight)
        if not extra:
            continue
        rows = dataset_ids == dataset
        if weight is None:
            weight = torch.ones(seg.shape, dtype=torch.float32, device=seg.device)
        weight[rows] = lesion_pixel_weight(seg[rows], extra)
    return weight


def latent_diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Selective MSE for latents ``[B, M, C, h, w]`` (target: noise, ``v`` or ``x0``, as the scheduler says)."""
    return _selective_mean(lambda p, t: (p - t).square(), pred, target, weight)


def lsgan_loss(logits: Logits, target_is_real: bool, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Least-squares GAN loss ``mean((D - label)^2)``, label 1 for real, 0 for fake.

    ``logits`` is one tensor ``[B, 1, h, w]`` or a mapping modality index -> such a tensor. With
    ``weight [B, M]`` (mapping only), the mean runs over the (sample, modality) pairs with weight > 0.
    """
    if isinstance(logits, torch.Tensor):
        return _patch_lsgan(logits, target_is_real=target_is_real, for_discriminator=True)[0].mean()
    if not logits:
        raise ValueError("no logits given")
    losses = torch.stack(
        [_patch_lsgan(x, target_is_real=target_is_real, for_discriminator=True)[0].flatten(1).mean(1)
         for x in logits.values()],
        dim=1,
    )  # [B, len(logits)]
    if weight is None:
        return losses.mean()
    weight = torch.as_tensor(weight, device=losses.device).to(losses.dtype)[:, list(logits)]
    if not (weight > 0).any():
        return losses.sum() * 0.0
    return (losses * weight).sum() / weight.sum()


def generator_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    synthesis_weight: torch.Tensor,
    reconstruction_weight: torch.Tensor,
    fake_logits: Mapping[int, torch.Tensor] | None = None,
    lambda_syn: float = 100.0,
    lambda_rec: float = 30.0,
    lambda_adv: float = 1.0,
    pixel_weight: torch.Tensor | None = None,
    lambda_ssim: float = 0.0,
    brain: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """``lambda_syn * L1_syn + lambda_rec * L1_rec + lambda_adv * LSGAN (+ lambda_ssim * (1 - SSIM_syn))``
    on ``[B, M, H, W]`` images.

    ``fake_logits`` maps a target modality index to the discriminator's logits on the synthesized
    image; the adversarial term covers the synthesized modalities with ground truth. ``pixel_weight``
    ``[B, H, W]`` weights the synthesis L1's pixels (lesions, :func:`lesion_pixel_weight`). With
    ``lambda_ssim > 0`` the synthesized images' SSIM inside ``brain`` ``[B, H, W]`` (default: the whole
    image) is a term too (:func:`selective_ssim_loss`).
    """
    synthesis = selective_l1(pred, target, synthesis_weight, pixel_weight)
    reconstruction = selective_l1(pred, target, reconstruction_weight)
    if fake_logits:
        adversarial = lsgan_loss(fake_logits, target_is_real=True, weight=synthesis_weight)
    else:
        adversarial = torch.zeros((), device=pred.device, dtype=pred.dtype)
    loss = lambda_syn * synthesis + lambda_rec * reconstruction + lambda_adv * adversarial
    terms = {"synthesis_l1": synthesis, "reconstruction_l1": reconstruction, "adversarial": adversarial}
    if lambda_ssim:
        terms["synthesis_ssim"] = selective_ssim_loss(pred, target, synthesis_weight, brain)
        loss = loss + lambda_ssim * terms["synthesis_ssim"]
    return {"loss": loss, **terms}


def discriminator_loss(
    real_logits: Logits, fake_logits: Logits, weight: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """LSGAN discriminator loss ``0.5 * (mean((D(real) - 1)^2) + mean(D(fake)^2))``.

    Logits as in :func:`lsgan_loss`; pass the synthesis weight with per-modality mappings so only
    modalities with ground truth count. Detach the fakes before calling.
    """
    real = lsgan_loss(real_logits, target_is_real=True, weight=weight)
    fake = lsgan_loss(fake_logits, target_is_real=False, weight=weight)
    return {"loss": 0.5 * (real + fake), "real": real, "fake": fake}


def vae_loss(
    recon: torch.Tensor,
    target: torch.Tensor,
    posterior: DiagonalGaussianDistribution,
    kl_weight: float = 1e-8,
    ssim_weight: float = 0.5,
    data_range: float = 2.0,
) -> dict[str, torch.Tensor]:
    """``L1 + ssim_weight * (1 - SSIM) + kl_weight * KL`` for images ``[N, 1, H, W]`` in [-1, 1].

    The KL is summed over latent elements and averaged over the batch (the LDM convention).
    SSIM is MONAI's (Gaussian window 11), so images must be at least 11 pixels a side.
    ``kl_weight`` stays <= 1e-8 by default: with an L1-only reconstruction loss, 1e-6 is a known
    posterior-collapse setting (a BraTS autoencoder fell from 37 to 16.6 dB with it).
    """
    l1 = F.l1_loss(recon, target)
    from monai.losses import SSIMLoss

    ssim = SSIMLoss(spatial_dims=2, data_range=data_range)(recon.float(), target.float())
    kl = posterior.kl().mean()
    loss = l1 + ssim_weight * ssim + kl_weight * kl
    return {"loss": loss, "l1": l1, "ssim": ssim, "kl": kl}


def vae_adversarial_loss(
    fake_logits: torch.Tensor, step: int, start_step: int, weight: float = 0.01
) -> torch.Tensor:
    """``weight * LSGAN(fake -> real)`` once ``step >= start_step``, zero before (the warm-up gate).

    The default weight is MONAI's autoencoder tutorial's.
    """
    if step < start_step:
        return fake_logits.new_zeros(())
    return weight * lsgan_loss(fake_logits, target_is_real=True)
