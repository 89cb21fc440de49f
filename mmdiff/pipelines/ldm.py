"""The diffusion pipeline: residual diffusion on a one-step predictor, in a lossless wavelet latent.

The predictor (a :class:`~mmdiff.models.MultiModalGenerator`) gives the mean ``mu`` of every missing
sequence in one pass; the :class:`~mmdiff.models.unet.ResidualUNet` samples the residual ``y - mu``
in the latent (:class:`~mmdiff.models.wavelet.HaarWavelet` by default). ``num_samples = K`` draws K
residuals per slice:

- the point estimate is ``mu`` + the residual's posterior mean (or the mean of the K samples: a single
  sample from the posterior has twice the posterior mean's squared error, -3 dB, the mean of K
  samples ``1 + 1/K`` times it), the residual weighted by :class:`ResidualFit`, fitted on validation
  slices so that a residual which does not help there is shrunk toward 0 (the predictor's image);
- the uncertainty is their per-voxel standard deviation (with an ``error_model``, combined with its
  learned error scale: :func:`combined_spread`), times a scale fitted on validation slices
  (``interval_scale`` in the pipeline config, ``interval_scales`` per target sequence) so that
  ``image +- uncertainty`` covers the stated fraction (``coverage``) of brain voxels;
- ``return_samples=True`` also returns the individual samples (``mu`` + one residual each).

The maths lives in :func:`sample_residuals` (and :func:`denoise` under it), which the pipeline's
``__call__`` and the training stage's validation and calibration (:func:`calibrate`, also
``mmdiff calibrate``) all call.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.error_scale import ErrorScaleNet
from ..models.gan import MultiModalGenerator
from ..models.unet import ResidualUNet
from ..data.preprocessing import MRIPreprocessor
from ..models.vae import Latent, decode_modalities, downsampling_factor, encode_modalities
from .common import (ImageInput, MMDiffPipelineOutput, from_network, inside_brain, prepare_inputs, resolve_dataset_id,
                     to_network)
from .precision import network_autocast, resolve_precision

#: schedulers by the names ``mmdiff synthesize/evaluate --scheduler`` take; any other diffusers scheduler
#: can be assigned to ``pipe.scheduler`` directly.
SCHEDULERS = {"dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler,
              "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}

#: the training scheduler's config: x0 ("sample") prediction, no clipping (residual latents are not in
#: [-1, 1]), trailing timesteps so that a few-step sampler starts from the noisiest timestep.
TRAINING_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                      "beta_end": 0.012, "prediction_type": "sample", "clip_sample": False,
                      "timestep_spacing": "trailing"}


def use_scheduler(pipe: "MMDiffPipeline", name: str) -> None:
    """Give ``pipe`` the scheduler called ``name`` (see :data:`SCHEDULERS`), built from its scheduler's config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)


StepCallback = Callable[[int, torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def denoise(
    unet: ResidualUNet,
    scheduler: SchedulerMixin,
    condition: torch.Tensor,
    sources: torch.Tensor,
    dataset_id: torch.Tensor | int,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    interrupted: Callable[[], bool] | None = None,
    first_only: bool = False,
    noise: torch.Tensor | None = None,
    precision: str = "float32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """One reverse process over the scaled residual latents ``[B, M, C, h, w]`` (zero at sources).

    Noise is drawn in every non-source channel (as in training, where every non-source is noised;
    the caller keeps the targets it wants); ``noise`` (standard normal, shaped like ``condition``)
    replaces the initial draw (diffusers' ``latents``), and ``generator`` then serves only a
    stochastic scheduler's steps. The UNet predicts the clean residual; the scheduler turns
    it into the next latents. ``callback(step_index, timestep, latents)`` runs after each step and may
    return replacement latents; once ``interrupted()`` is true the remaining steps are skipped.

    Returns:
        ``(sample, first_prediction)``: the sample, and the UNet's clean prediction at the first
        (noisiest) step. At that step the input is almost pure noise (signal-to-noise ratio ~0.005 at
        t = 999), so an MSE-trained x0 predictor outputs about ``E[residual | conditions]``: the
        posterior mean, without the sampling variance a mean of K samples keeps (``1/K`` of the MMSE).
        With ``first_only`` the process stops there and returns that prediction twice (the callback
        then sees that prediction as step 0).
    """
    batch, device, dtype = condition.shape[0], condition.device, condition.dtype
    noised = (~torch.as_tensor(sources, device=device).bool().expand(batch, -1))[:, :, None, None, None].to(dtype)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(num_inference_steps, device=device)
    if noise is None:
        noise = randn_tensor(condition.shape, generator=generator, device=device, dtype=dtype)
    latents = noise.to(device=device, dtype=dtype) * scheduler.init_noise_sigma * noised
    first = torch.zeros_like(latents)
    for index, t in enumerate(scheduler.timesteps):
        if interrupted is not None and interrupted():
            break
        model_input = scheduler.scale_model_input(latents.flatten(1, 2), t).view_as(latents)
        with network_autocast(precision, device):
            prediction = unet(model_input, t.expand(batch), condition, sources, dataset_id).sample
        prediction = prediction.to(dtype)
        if index == 0:
            first = prediction * noised
            if first_only:  # the one "step" of this path is the prediction itself
                replaced = callback(index, t, first) if callback is not None else None
                first = first if replaced is None else replaced
                return first, first
        latents = scheduler.step(prediction.flatten(1, 2), t, latents.flatten(1, 2), **step_kwargs).prev_sample
        latents = latents.view_as(condition) * noised
        if callback is not None:
            replaced = callback(index, t, latents)
            latents = latents if replaced is None else replaced
    return latents, first


def predictor_mean_inside_brain(predictor: MultiModalGenerator, mu: torch.Tensor,
                                brain: torch.Tensor | None) -> torch.Tensor:
    """The predictor's mean as the residual diffusion sees it, in training and sampling alike: as it
    is, or, for a predictor trained to be right inside the brain only (``config.inside_brain``), which
    draws what it likes outside it, background outside the brain ``[B, H, W]``."""
    if not getattr(predictor.config, "inside_brain", False):
        return mu
    if brain is None:
        raise ValueError("this predictor was trained inside the brain only (config.inside_brain): its mean needs "
                         "the brain mask; pass brain= (the slices' masks, [B, H, W]) or call the pipeline, which derives one")
    return inside_brain(mu, brain.to(mu.device))


@torch.no_grad()
def sample_residuals(
    predictor: MultiModalGenerator,
    vae: Latent,
    unet: ResidualUNet,
    scheduler: SchedulerMixin,
    images: torch.Tensor,
    sources: torch.Tensor,
    dataset_id: torch.Tensor | int,
    num_samples: int,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    interrupted: Callable[[], bool] | None = None,
    first_only: bool = False,
    context: torch.Tensor | None = None,
    noise: Callable[[torch.Size], torch.Tensor] | None = None,
    precision: str = "float32",
    brain: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The predictor's mean and ``num_samples`` residuals, for a batch of slices (the pipeline's maths).

    Args:
        images: ``[B, M, H, W]`` in the networks' [-1, 1]; non-sources are ignored.
        sources: bool ``[M]`` or ``[B, M]``: each row is conditioned on its own sources.
        dataset_id: an int or ``[B]`` (``-1``: null), for the predictor and the UNet alike.
        first_only: run only the first denoising step (enough for the posterior-mean point estimate
            when no sample is wanted); the "residuals" are then those first-step predictions.
        context: ``[B, M, 2k, H, W]`` in [-1, 1], the axial neighbours a 2.5D predictor reads (see
            :meth:`~mmdiff.models.MultiModalGenerator.forward`).
        noise: ``latent shape -> [K, *shape]`` initial noise for the K runs (e.g. :class:`SmoothSliceNoise`);
            default: drawn from ``generator``.
        precision: the networks' (resolved, :mod:`~mmdiff.pipelines.precision`); the latent's
            transforms stay in ``images``' dtype.
        brain: ``[B, H, W]`` bool, the brain mask; needed with a predictor trained inside the brain only
            (``predictor.config.inside_brain``), whose mean is then background outside it, as in training.

    Returns:
        ``(mu [B, M, H, W], residuals [K, B, M, H, W], posteriors [K, B, M, H, W])`` in [-1, 1] units:
        a sample is ``mu + residual``; each run's ``posteriors[k]`` is its estimate of the posterior-mean
        residual (the UNet's first-step clean prediction, see :func:`denoise`), and their mean is the
        pipeline's. An untrained (zero-output) UNet gives residuals and posteriors that are exactly zero.
    """
    batch = images.shape[0]
    sources = torch.as_tensor(sources, device=images.device).bool().expand(batch, -1)
    context = None if context is None else context.to(predictor.dtype)
    with network_autocast(precision, images.device):
        mu = predictor(images.to(predictor.dtype), sources, dataset_id, context=context)
    mu = predictor_mean_inside_brain(predictor, mu.to(images.dtype), brain)
    mu_latents = encode_modalities(vae, mu)
    planes = sources[:, :, None, None, None]
    condition = torch.where(planes, encode_modalities(vae, images), mu_latents)
    base = decode_modalities(vae, mu_latents)  # decode(latent(mu)): mu itself, up to the latent's loss
    scale = float(unet.config.residual_scale)

    def to_image(latents):
        # residual in image space: decode(latent(mu) + r) - decode(latent(mu)), exactly 0 for r = 0 (and
        # decode(r) for a linear latent such as the wavelet)
        residual = decode_modalities(vae, mu_latents + latents.to(mu_latents.dtype) / scale) - base
        return torch.where(sources[:, :, None, None], torch.zeros_like(residual), residual)

    initial = None if noise is None else noise(condition.shape)
    residuals, firsts = [], []
    for k in range(num_samples):
        latents, first = denoise(unet, scheduler, condition.to(unet.dtype), sources, dataset_id,
                                 num_inference_steps, generator, callback, interrupted, first_only,
                                 None if initial is None else initial[k], precision)
        residuals.append(to_image(latents))
        firsts.append(first)
    return mu, torch.stack(residuals), torch.stack([to_image(first) for first in firsts])


#: K for a pipeline not calibrated for one (two samples give a spread to calibrate; a calibrated
#: pipeline's default is the K its scale was fitted at: :attr:`MMDiffPipeline.default_num_samples`)
DEFAULT_NUM_SAMPLES = 2

#: how the pipeline's image is formed from the K runs (see :func:`point_and_spread`)
POINT_ESTIMATES = ("posterior_mean", "sample_mean")


def point_and_spread(mu: torch.Tensor, residuals: torch.Tensor, posteriors: torch.Tensor | None = None,
                     point_estimate: str = "sample_mean", residual_weight: float = 1.0, window: int = 1,
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(point estimate, the samples' spread (:func:`sample_spread`) or None for one sample)``, in
    [-1, 1] units.

    ``"sample_mean"``: ``mu`` + the mean of the K residual samples (MSE ``MMSE * (1 + 1/K)`` for a
    perfect sampler); ``"posterior_mean"``: ``mu`` + the mean of the K runs' posterior-mean residuals
    (``posteriors`` from :func:`sample_residuals`; no sampling error, only the first step's). The
    residual is added times ``residual_weight`` (:meth:`ResidualFit.weight`; 1: as the UNet gives it).
    """
    point = mu + float(residual_weight) * point_runs(residuals, posteriors, point_estimate).mean(0)
    return point, sample_spread(residuals, window)


#: the pooling window a new calibration uses (``mmdiff calibrate``, the training export): see :func:`sample_spread`
DEFAULT_UNCERTAINTY_WINDOW = 5


def sample_spread(residuals: torch.Tensor, window: int = 1) -> torch.Tensor | None:
    """The std of K samples ``[K, B, M, H, W]`` per voxel, its variance pooled over a ``window x
    window`` neighbourhood in the slice (1: per voxel); None for one sample.

    Why pool: K samples give each voxel's variance only K - 1 degrees of freedom (with the default
    K = 2, one: the std is |a - b| / sqrt 2, as likely near 0 as large wherever the model is unsure),
    so a per-voxel map ranks the errors poorly. Averaging the variance over a 5 x 5 neighbourhood
    gives ~25 (K - 1) degrees of freedom at the cost of a map that is 5 pixels coarse; on the
    validation slices it raised the rank correlation of the uncertainty with the error from 0.13 to
    0.22 at K = 2 (0.21 unpooled at K = 4; BENCHMARKS.md, session 9). The interval scale is
    calibrated for the window it is used with.
    """
    if len(residuals) < 2:
        return None
    variance = residuals.var(0)
    window = int(window)
    if window > 1:
        shape = variance.shape
        flat = variance.reshape(-1, 1, *shape[-2:])
        pad = window // 2
        flat = F.avg_pool2d(F.pad(flat, (pad, window - 1 - pad) * 2, mode="replicate"), window, stride=1)
        variance = flat.reshape(shape)
    return variance.sqrt()


def error_scale(error_model: ErrorScaleNet | None, images: torch.Tensor, mu: torch.Tensor, sources: torch.Tensor,
                dataset_id: torch.Tensor | int, precision: str = "float32") -> torch.Tensor | None:
    """The error model's Laplace scale ``b`` ``[B, M, H, W]`` ([-1, 1] units) of ``mu``'s error, given the
    sources (``images`` where ``sources``) and ``mu`` elsewhere; None without an error model."""
    if error_model is None:
        return None
    batch = images.shape[0]
    planes = torch.as_tensor(sources, device=images.device).bool().expand(batch, -1)[:, :, None, None]
    condition = torch.where(planes, images, mu).to(error_model.dtype)
    with network_autocast(precision, images.device):
        log_scale = error_model(condition, planes[:, :, 0, 0], dataset_id)
    return torch.exp(log_scale.to(images.dtype))


def combined_spread(std: torch.Tensor | None, scale: torch.Tensor | None) -> torch.Tensor | None:
    """The uncertainty before calibration: ``sqrt(std^2 + 2 b^2)``, the samples' spread and the error
    model's Laplace scale ``b`` (whose standard deviation is ``sqrt(2) b``) as two variances; either
    alone where the other is None (one sample; no error model). Calibration scales the sum as a
    whole, so only where it is large matters, not its level."""
    if scale is None:
        return std
    variance = 2 * scale.square()
    return (variance if std is None else variance + std.square()).sqrt()


def point_runs(residuals: torch.Tensor, posteriors: torch.Tensor | None, point_estimate: str) -> torch.Tensor:
    """The K per-run residual estimates ``[K, ...]`` whose mean the point estimate adds to ``mu``."""
    if point_estimate not in POINT_ESTIMATES:
        raise ValueError(f"point_estimate must be one of {', '.join(POINT_ESTIMATES)}, got {point_estimate!r}")
    if point_estimate == "sample_mean":
        return residuals
    if posteriors is None:
        raise ValueError("the posterior_mean point estimate needs the posterior-mean residuals")
    return posteriors


@dataclass(frozen=True)
class ResidualFit:
    """How much of the UNet's residual the point estimate adds, for any number of runs K.

    The point estimate is ``mu + w * m_K``, ``m_K`` the mean of K runs' residual estimates ``r_k``
    (each ``E[r | sources]`` plus run-to-run noise). The ``w`` that minimises its squared error is
    ``<y - mu, m_K> / <m_K, m_K>``; the noise is independent of the error, so over calibration voxels

        w(K) = cross / (signal + noise / K),   clipped to [0, 1],

    with ``cross`` the mean of ``(y - mu) * m``, ``noise`` the mean per-run variance of ``r_k`` and
    ``signal`` the mean of ``m^2`` less ``noise / K_cal`` (unbiased for ``E[r | sources]^2``). A
    residual that does not help on held-out slices (an undertrained UNet, a site it never saw) is
    shrunk toward 0, the predictor's own image; one run (K = 1) is noisier and weighs less than the
    mean of 8. With one calibration run the noise cannot be told from the signal: ``noise`` is 0 and
    the K = 1 weight is used for every K (cautious for larger K).
    """

    cross: float
    signal: float
    noise: float

    def weight(self, num_samples: int) -> float:
        energy = max(self.signal, 0.0) + self.noise / max(int(num_samples), 1)
        if energy <= 0:
            return 1.0  # nothing to weigh: an untrained UNet's residual is exactly zero
        return float(np.clip(self.cross / energy, 0.0, 1.0))

    @classmethod
    def fit(cls, predictor_errors: np.ndarray, runs: np.ndarray) -> "ResidualFit":
        """From ``y - mu`` ``[N]`` and the K runs' residual estimates ``[K, N]`` at the same voxels."""
        errors, runs = np.asarray(predictor_errors, np.float64), np.asarray(runs, np.float64)
        mean = runs.mean(0)
        noise = float(runs.var(0, ddof=1).mean()) if len(runs) > 1 else 0.0
        return cls(cross=float((errors * mean).mean()), signal=float(np.square(mean).mean()) - noise / len(runs),
                   noise=noise)


def fit_interval_scale(errors: np.ndarray, spread: np.ndarray, coverage: float) -> float:
    """The smallest ``s`` with ``|error| <= s * spread`` on a ``coverage`` fraction of the voxels.

    Split-conformal scaling: the ``coverage`` quantile (finite-sample corrected) of the ratio
    ``|error| / spread`` over calibration voxels (brain voxels of synthesised validation sequences).
    """
    if not 0 < coverage < 1:
        raise ValueError(f"coverage must lie in (0, 1), got {coverage}")
    ratio = np.abs(np.asarray(errors, np.float64)) / np.maximum(np.asarray(spread, np.float64), 1e-8)
    if ratio.size == 0:
        raise ValueError("no voxels to calibrate on")
    level = min(1.0, math.ceil((ratio.size + 1) * coverage) / ratio.size)
    return float(np.quantile(ratio, level, method="higher"))


def rank_correlation(spread: np.ndarray, error: np.ndarray, max_points: int | None = None) -> float:
    """Spearman's rank correlation of a stated spread with the absolute error; NaN where either is
    constant (it ranks nothing). ``max_points``: rank an evenly spaced subset of at most that many
    points (calibration: ranking millions of voxels takes seconds); None: every point."""
    from scipy.stats import spearmanr

    step = 1 if max_points is None else max(1, len(spread) // max_points)
    spread, error = np.asarray(spread)[::step], np.asarray(error)[::step]
    if np.ptp(spread) == 0 or np.ptp(error) == 0:  # a constant ranks nothing
        return float("nan")
    return float(spearmanr(spread, error).statistic)


#: calibration voxels a target sequence needs for a scale of its own (about two slices of brain)
MIN_TARGET_VOXELS = 40_000

#: calibration voxels a finer group (a target on one dataset, or from one source) needs for a scale of
#: its own (about five slices of brain: the group's quantile comes from several slices, not one lesion)
MIN_GROUP_VOXELS = 100_000


def interval_groups(target: str, dataset: str | None = None, num_sources: int | None = None) -> list[str]:
    """The calibration groups of a target's voxels, most specific first: the target on ``dataset`` from
    that many sources (one, or two and more), on ``dataset``, from that many sources, the target alone.

    Why finer than the target: the error model and the samples misjudge the error by different factors
    on different sites and conditions. Held out, the per-target scale covered real BraTS T1C 0.84 while
    the phantoms' T1C was covered 0.97-0.99, and T1 -> T2 (one source) 0.72-0.85 while T2 from several
    sources was over-covered (BENCHMARKS.md, sessions 12-13). A scale per group (Mondrian split-conformal)
    makes the stated coverage hold for each group with enough calibration voxels; a group without them
    falls back to the next one, and the key names say what each scale is for. The guarantee holds for
    cases like the calibration cases: with two validation cases of real BraTS the groups made its test
    cases' coverage worse (0.81 against 0.84 with per-target scales; BENCHMARKS.md, session 13), so
    :func:`calibrate` fits them only when asked (``mmdiff calibrate --groups``).
    """
    groups = []
    sources = None if num_sources is None else ("from 1 source" if int(num_sources) == 1 else "from 2+ sources")
    if dataset is not None:
        if sources:
            groups.append(f"{target} on {dataset} {sources}")
        groups.append(f"{target} on {dataset}")
    if sources:
        groups.append(f"{target} {sources}")
    return groups + [target]


def fit_interval_scales(errors: Mapping[str, np.ndarray], spreads: Mapping[str, np.ndarray], coverage: float,
                        min_voxels: int = MIN_TARGET_VOXELS) -> tuple[float, dict[str, float]]:
    """``(scale over every voxel, {target: its own scale})``: :func:`fit_interval_scale` pooled, and per
    target sequence (Mondrian split-conformal: the guarantee then holds for each target separately).

    Why per target: one pooled scale covers the pooled voxels, but the samples' spread misjudges some
    sequences more than others (held-out DWI was covered 0.69 of the time for the nominal 0.90, ADC
    0.92; BENCHMARKS.md, session 9). A target with fewer than ``min_voxels`` calibration voxels keeps
    the pooled scale.
    """
    pooled = fit_interval_scale(np.concatenate([np.ravel(errors[m]) for m in errors]),
                                np.concatenate([np.ravel(spreads[m]) for m in errors]), coverage)
    own = {m: fit_interval_scale(errors[m], spreads[m], coverage) for m in errors if np.size(errors[m]) >= min_voxels}
    return pooled, own


def _group_units(units: Sequence[Sequence[str]]) -> dict[str, list[int]]:
    """Finer group -> the calibration units in it (every name of a unit but the target-level last one)."""
    members: dict[str, list[int]] = {}
    for unit, names in enumerate(units):
        for name in names[:-1]:
            members.setdefault(name, []).append(unit)
    return members


def fit_group_scales(errors: np.ndarray, spreads: np.ndarray, groups: Sequence[Sequence[str]], members: np.ndarray,
                     coverage: float, min_voxels: int = MIN_GROUP_VOXELS) -> dict[str, float]:
    """``{group: its own scale}`` for the finer groups of :func:`interval_groups` with at least
    ``min_voxels`` calibration voxels. ``groups[i]`` are the group names of calibration unit ``i`` (a
    synthesised target of one slice) and ``members[v]`` the unit of voxel ``v``; the target-level group
    (the last name) is :func:`fit_interval_scales`'s and is left out here."""
    scales = {}
    for name, chosen in _group_units(groups).items():
        voxels = np.isin(members, chosen)
        if voxels.sum() >= min_voxels:
            scales[name] = fit_interval_scale(errors[voxels], spreads[voxels], coverage)
    return scales


@dataclass
class Calibration:
    """What :func:`calibrate` fits on validation slices, stored in the pipeline config."""

    residual_fit: ResidualFit | None  #: the point estimate's residual weight for any K (None: weight 1)
    interval_scale: float | None  #: see :func:`fit_interval_scale` (None with one sample: no spread)
    num_samples: int  #: K of the calibration runs (the scale is fitted for this K)
    voxels: int  #: calibration points (brain voxels of synthesised sequences with ground truth)
    predictor_mse: float  #: of ``mu`` on them, [-1, 1] units
    point_mse: float  #: of the weighted point estimate at K = ``num_samples`` on them
    uncertainty_window: int = 1  #: the spread's pooling window (:func:`sample_spread`) the scale holds for
    #: one scale per target sequence with enough calibration voxels (:func:`fit_interval_scales`), and
    #: one per finer group with enough (:func:`interval_groups`, :func:`fit_group_scales`)
    interval_scales: dict[str, float] | None = None
    target_voxels: dict[str, int] | None = None  #: calibration voxels per target sequence
    group_voxels: dict[str, int] | None = None  #: calibration voxels per finer group
    #: rank correlation of the (unscaled) spread with |error| on the calibration voxels (None: no spread)
    spearman: float | None = None
    spearman_samples: float | None = None  #: the same for the samples' spread alone (None: one sample)

    def weight(self, num_samples: int) -> float:
        return 1.0 if self.residual_fit is None else self.residual_fit.weight(num_samples)

    def pipeline_config(self) -> dict:
        """What :class:`MMDiffPipeline` stores of it (its ``__init__`` / ``register_to_config`` keywords)."""
        return {"residual_fit": None if self.residual_fit is None else dataclasses.asdict(self.residual_fit),
                "interval_scale": self.interval_scale, "interval_scales": self.interval_scales,
                "calibration_samples": self.num_samples if self.interval_scale is not None else None,
                "uncertainty_window": self.uncertainty_window}


@torch.no_grad()
def calibrate(
    predictor: MultiModalGenerator,
    vae: Latent,
    unet: ResidualUNet,
    scheduler: SchedulerMixin,
    slices: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, torch.Tensor, torch.Tensor | None]],
    num_samples: int,
    num_inference_steps: int,
    coverage: float,
    point_estimate: str = "posterior_mean",
    generator: torch.Generator | None = None,
    fit_weight: bool = True,
    uncertainty_window: int = 1,
    error_model: ErrorScaleNet | None = None,
    groups: bool = False,
) -> Calibration:
    """The residual weight (:class:`ResidualFit`), then the interval scale, over validation slices
    sampled as the pipeline samples.

    Each slice is ``(images [M, H, W] in [0, 1], sources [M], targets [M], dataset_id, brain [H, W],
    context [M, 2k, H, W] in [0, 1] or None)`` (the context only for a 2.5D predictor); every brain
    voxel of every target (with ground truth) is one calibration point. The scale is fitted for the
    weighted point estimate at ``num_samples`` runs (``fit_weight=False`` keeps the weight at 1), for the
    spread the pipeline states (:func:`combined_spread`: the samples', with ``error_model``'s scale).
    ``groups``: also one scale per finer group (:func:`interval_groups`); off by default, since with
    two validation cases of a site they made its held-out coverage worse, not better (BENCHMARKS.md,
    session 13): use them with many validation cases per site.
    """
    errors, runs, spreads, sample_spreads, names, units, members = [], [], [], [], [], [], []
    modalities = list(unet.config.modalities)
    dataset_names = list(unet.config.dataset_names or [])
    device = unet.device
    for images, sources, targets, dataset_id, brain, context in slices:
        dataset = dataset_names[int(dataset_id)] if 0 <= int(dataset_id) < len(dataset_names) else None
        images = to_network(images[None].to(device=device, dtype=unet.dtype))
        if context is not None:
            context = to_network(context[None].to(device=device, dtype=unet.dtype))
        brain = torch.as_tensor(brain, device=device).bool()
        mu, residuals, posteriors = sample_residuals(predictor, vae, unet, scheduler, images,
                                                     sources[None].to(device), dataset_id, num_samples,
                                                     num_inference_steps, generator, context=context,
                                                     brain=brain[None])
        estimates = point_runs(residuals, posteriors, point_estimate)
        spread_of_samples = sample_spread(residuals, uncertainty_window)
        std = combined_spread(spread_of_samples,
                              error_scale(error_model, images, mu, sources[None].to(device), dataset_id))
        for m in torch.as_tensor(targets).nonzero().flatten().tolist():
            errors.append((images[0, m] - mu[0, m])[brain].double().cpu().numpy())
            runs.append(estimates[:, 0, m][:, brain].double().cpu().numpy())
            names.append(np.full(errors[-1].size, m, dtype=np.int16))
            if groups:
                members.append(np.full(errors[-1].size, len(units), dtype=np.int32))
                units.append(interval_groups(modalities[m], dataset, int(torch.as_tensor(sources).sum())))
            if std is not None:
                spreads.append(std[0, m][brain].cpu().numpy())
            if spread_of_samples is not None:
                sample_spreads.append(spread_of_samples[0, m][brain].cpu().numpy())
    if not errors:
        raise ValueError("no voxels to calibrate on")
    errors, runs, names = np.concatenate(errors), np.concatenate(runs, axis=1), np.concatenate(names)
    fit = ResidualFit.fit(errors, runs) if fit_weight else None
    weight = 1.0 if fit is None else fit.weight(num_samples)
    point_errors = errors - weight * runs.mean(0)
    scale, scales, rank = None, None, None
    if spreads:
        spreads = np.concatenate(spreads)
        rank = rank_correlation(spreads, np.abs(point_errors), max_points=500_000)
        present = [int(m) for m in np.unique(names)]
        scale, scales = fit_interval_scales({modalities[m]: point_errors[names == m] for m in present},
                                            {modalities[m]: spreads[names == m] for m in present}, coverage)
        if groups:  # off by default: with two validation cases of a site they under-covered its test cases
            members = np.concatenate(members)
            scales |= fit_group_scales(point_errors, spreads, units, members, coverage)
    rank_samples = (rank_correlation(np.concatenate(sample_spreads), np.abs(point_errors), max_points=500_000)
                    if sample_spreads else None)
    return Calibration(residual_fit=fit, interval_scale=scale, num_samples=num_samples, voxels=int(errors.size),
                       predictor_mse=float(np.mean(errors ** 2)), point_mse=float(np.mean(point_errors ** 2)),
                       uncertainty_window=int(uncertainty_window), interval_scales=scales, spearman=rank,
                       spearman_samples=rank_samples,
                       target_voxels={modalities[int(m)]: int(n)
                                      for m, n in zip(*np.unique(names, return_counts=True))},
                       group_voxels=None if scale is None or not groups else _group_voxels(units, members))


def _group_voxels(units: Sequence[Sequence[str]], members: np.ndarray) -> dict[str, int]:
    """Calibration voxels of each finer group."""
    per_unit = np.bincount(members, minlength=len(units))
    return {name: int(per_unit[chosen].sum()) for name, chosen in sorted(_group_units(units).items())}


#: how a volume's axial slices draw their noise (see :class:`SmoothSliceNoise`, :func:`slice_generators`)
SLICE_NOISE = ("smooth", "shared", "independent")

#: the smooth noise's correlation length along z, in slices (see :class:`SmoothSliceNoise`)
SMOOTH_NOISE_SLICES = 1.0


def draw_seed(generator: torch.Generator | None) -> int:
    """A seed from ``generator`` (``None``: torch's global RNG); the generator moves on."""
    device = None if generator is None else generator.device
    return int(torch.randint(0, 2**62, (1,), generator=generator, device=device).item())


class SmoothSliceNoise:
    """Initial noise that varies smoothly along z, the same for a slice whatever the batching.

    The rule: slice ``z`` starts sample ``k`` from ``n_z = sum_j w_j e_{z+j}``, where every ``e_z`` is
    independent standard normal noise drawn from its own seed (``seed + z``) and ``w`` is a Gaussian
    of ``sigma`` slices, normalised so that ``sum_j w_j^2 = 1``. So each ``n_z`` is exactly standard
    normal (each voxel's distribution, the point estimate and the uncertainty are those of any other
    noise), and neighbouring slices are correlated by ``exp(-d^2 / (4 sigma^2))`` at ``d`` slices apart.

    Why: the sampler is deterministic given its noise, so the noise's structure along z becomes the
    sample's. Independent noise per slice (``"independent"``) changes a sample's texture from one
    slice to the next: horizontal stripes in sagittal and coronal views. The same noise on every slice
    (``"shared"``) repeats one texture through the whole volume: vertical streaks. Noise correlated
    over a few slices, as the texture of anatomy is, gives neither (BENCHMARKS.md, session 10).
    """

    def __init__(self, seed: int, num_samples: int, sigma: float = SMOOTH_NOISE_SLICES):
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.seed, self.num_samples, self.sigma = int(seed), int(num_samples), float(sigma)
        radius = max(int(math.ceil(3 * sigma)), 1)
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float64)
        weights = torch.exp(-0.5 * (offsets / sigma) ** 2)
        self.offsets = offsets.long().tolist()
        self.weights = (weights / weights.square().sum().sqrt()).tolist()
        self._cache: dict[tuple[int, tuple], torch.Tensor] = {}

    def _slice(self, z: int, shape: tuple) -> torch.Tensor:
        key = (z, shape)
        if key not in self._cache:
            generator = torch.Generator().manual_seed((self.seed + z) % 2**63)
            self._cache[key] = torch.randn((self.num_samples, *shape), generator=generator)
        return self._cache[key]

    def __call__(self, slices: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
        """``[K, len(slices), *shape]`` float32 on the CPU: the noise of each slice's K samples."""
        shape = tuple(int(n) for n in shape)
        out = []
        for z in slices:
            n = torch.zeros((self.num_samples, *shape))
            for d, w in zip(self.offsets, self.weights):
                n.add_(self._slice(int(z) + d, shape), alpha=w)
            out.append(n)
        low = min(int(z) for z in slices) + self.offsets[0]  # batches go up the volume: drop what is behind
        for key in [key for key in self._cache if key[0] < low]:
            del self._cache[key]
        return torch.stack(out, dim=1)


def slice_generators(generator: torch.Generator | None, num_slices: int, slice_noise: str = "shared",
                     ) -> list[torch.Generator]:
    """One generator per axial slice, from one generator (``None``: torch's global RNG).

    ``"shared"``: every slice starts each sample from the same noise. The sampler is deterministic
    given its noise, so a sample then changes from slice to slice only as the sources do: no
    horizontal stripes in a sagittal view of a sample, but one texture repeated through the volume
    (vertical streaks). ``"independent"``: each slice its own noise (seeds ``s, s + 1, ...``); a
    sample's consecutive slices differ 3.5x more than a real volume's do (BENCHMARKS.md session 8).
    Each voxel's distribution, and so the point estimate and the uncertainty, is the same either way;
    a slice gets the same noise whatever the batch size. ``"smooth"`` (:class:`SmoothSliceNoise`)
    draws its initial noise itself; its generators (``"independent"``'s) serve only a stochastic
    scheduler's per-step noise.
    """
    if slice_noise not in SLICE_NOISE:
        raise ValueError(f"slice_noise must be one of {', '.join(SLICE_NOISE)}, got {slice_noise!r}")
    if slice_noise == "independent" or (slice_noise == "smooth" and num_slices > 1):
        device = None if generator is None else generator.device
        seed = draw_seed(generator)
        return [torch.Generator(device=device or "cpu").manual_seed(seed + k) for k in range(num_slices)]
    if generator is None:
        generator = torch.Generator().manual_seed(draw_seed(None))
    state = generator.get_state()  # every slice draws what the given generator would (a 2D input: the same)
    slices = [torch.Generator(device=generator.device) for _ in range(num_slices)]
    for clone in slices:
        clone.set_state(state)
    # the caller's generator moves on: a second call differs
    torch.randint(0, 2, (1,), generator=generator, device=generator.device)
    return slices


@dataclass
class MMDiffSamplesOutput(MMDiffPipelineOutput):
    """:class:`MMDiffPipelineOutput` plus, with ``return_samples=True``, ``samples``: target -> a list of
    the ``num_samples`` individual samples, each like ``images[target]``."""

    samples: dict | None = None


class MMDiffPipeline(DiffusionPipeline):
    """Synthesise missing MRI sequences by residual diffusion on a one-step predictor.

    Args:
        vae: the latent: :class:`~mmdiff.models.wavelet.HaarWavelet` (default) or an ``AutoencoderKL``.
        unet: the :class:`~mmdiff.models.unet.ResidualUNet`.
        scheduler: the sampler, kept as given (a ``DDPMScheduler`` samples with DDPM's many-step noise
            schedule; the training export saves the sampler the config names). Swap it at call time with
            :func:`use_scheduler` or ``pipe.scheduler = X.from_config(pipe.scheduler.config)``.
        predictor: the :class:`~mmdiff.models.MultiModalGenerator` that gives ``mu``.
        coverage: the fraction of brain voxels ``image +- uncertainty`` is calibrated to cover.
        interval_scale: the fitted scale (``None``: uncalibrated, the uncertainty is the raw std).
        interval_scales: calibration group -> its own fitted scale: a target sequence
            (:func:`fit_interval_scales`), or a finer group such as ``"t2 on brats from 1 source"``
            (:func:`interval_groups`); a call uses its most specific group's scale, and a target in none
            (or ``None``, pipelines calibrated before them) uses ``interval_scale``.
        calibration_samples: the ``num_samples`` the scale was fitted with.
        point_estimate: the default image: ``"posterior_mean"`` (``mu`` + the UNet's posterior-mean
            residual) or ``"sample_mean"`` (``mu`` + the mean of the K sampled residuals); see
            :func:`point_and_spread`. The scale is fitted for this choice.
        residual_fit: ``{cross, signal, noise}`` of a :class:`ResidualFit` fitted on validation slices
            with the scale (:func:`calibrate`): the point estimate of K runs adds the residual times
            ``ResidualFit.weight(K)`` (None: times 1, as the UNet gives it). Samples are never weighted.
        uncertainty_window: the uncertainty is the samples' std with its variance pooled over this
            many pixels square (:func:`sample_spread`; 1: per voxel, as pipelines saved before it).
        preprocessor: the intensity rule the models were trained with
            (:class:`~mmdiff.data.preprocessing.MRIPreprocessor`; None: the 99.5th-percentile rule of
            pipelines saved before it was stored).
        error_model: an :class:`~mmdiff.models.error_scale.ErrorScaleNet` trained on the predictor's
            errors (None: pipelines saved before it, or trained without one): the uncertainty then
            combines its error scale with the samples' spread (:func:`combined_spread`), and there is
            an uncertainty with one sample too.
    """

    engine = "ldm"
    _callback_tensor_inputs = ["latents"]
    _optional_components = ["preprocessor", "error_model"]

    def __init__(self, vae: Latent, unet: ResidualUNet, scheduler: SchedulerMixin, predictor: MultiModalGenerator,
                 coverage: float = 0.9, interval_scale: float | None = None, calibration_samples: int | None = None,
                 point_estimate: str = "posterior_mean", preprocessor: MRIPreprocessor | None = None,
                 residual_fit: Mapping[str, float] | None = None, uncertainty_window: int = 1,
                 interval_scales: Mapping[str, float] | None = None, error_model: ErrorScaleNet | None = None):
        super().__init__()
        if point_estimate not in POINT_ESTIMATES:
            raise ValueError(f"point_estimate must be one of {', '.join(POINT_ESTIMATES)}, got {point_estimate!r}")
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler, predictor=predictor, preprocessor=preprocessor,
                              error_model=error_model)
        self.register_to_config(coverage=coverage, interval_scale=interval_scale,
                                calibration_samples=calibration_samples, point_estimate=point_estimate,
                                residual_fit=None if residual_fit is None else
                                {k: float(v) for k, v in dict(residual_fit).items()},
                                uncertainty_window=int(uncertainty_window),
                                interval_scales=None if interval_scales is None else
                                {str(k): float(v) for k, v in dict(interval_scales).items()})
        self._interrupt = False

    def interval_scale_for(self, target: str, dataset: str | None = None, num_sources: int | None = None) -> float:
        """The calibrated scale of ``target``'s uncertainty, synthesised for ``dataset`` from ``num_sources``
        sequences: that of the most specific calibrated group (:func:`interval_groups`), else the pooled
        one (1: uncalibrated)."""
        own = self.config.get("interval_scales") or {}
        for group in interval_groups(target, dataset, num_sources):
            if group in own:
                return float(own[group])
        return 1.0 if self.config.interval_scale is None else float(self.config.interval_scale)

    @property
    def model_cpu_offload_seq(self) -> str:
        """diffusers' offload order; the Haar latent has no weights to move (and accelerate's offload
        hooks need a module with parameters), so it is left out of the chain."""
        chain = "predictor->vae->unet" if any(True for _ in self.vae.parameters()) else "predictor->unet"
        return chain + ("->error_model" if getattr(self, "error_model", None) is not None else "")

    @property
    def default_num_samples(self) -> int:
        """The K a call gets when it does not say: the K the uncertainty was calibrated at
        (``calibration_samples``: the stated interval holds for it), else :data:`DEFAULT_NUM_SAMPLES`."""
        calibrated = self.config.get("calibration_samples")
        return DEFAULT_NUM_SAMPLES if calibrated is None else int(calibrated)

    def residual_weight(self, num_samples: int) -> float:
        """The weight of the UNet's residual in the point estimate of ``num_samples`` runs (see
        :class:`ResidualFit`; 1 for a pipeline calibrated before it was fitted)."""
        fit = self.config.get("residual_fit")
        return 1.0 if fit is None else ResidualFit(**fit).weight(num_samples)

    @property
    def interrupt(self) -> bool:
        """Set by a ``callback_on_step_end`` (``pipe._interrupt = True``) to stop sampling early."""
        return self._interrupt

    @property
    def downsampling(self) -> int:
        """Slice sides must be multiples of this (the latent and UNet together, and the predictor)."""
        diffusion = downsampling_factor(self.vae) * self.unet.downsampling
        return math.lcm(diffusion, self.predictor.size_multiple)

    @property
    def context_slices(self) -> int:
        """Axial neighbours on each side the predictor reads (2.5D; 0: slice by slice)."""
        return int(self.predictor.config.context_slices)

    @property
    def modalities(self) -> list[str]:
        """The sequences the model knows, in its order."""
        return list(self.unet.config.modalities)

    @torch.no_grad()
    def __call__(
        self,
        images: Mapping[str, ImageInput],
        dataset: str | None = None,
        targets: str | Sequence[str] | None = None,
        num_inference_steps: int = 6,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_samples: int | None = None,
        output_type: str = "np",
        brain_mask: ImageInput | None = None,
        batch_size: int = 8,
        affine: np.ndarray | None = None,
        return_dict: bool = True,
        return_samples: bool = False,
        point_estimate: str | None = None,
        slices: Sequence[int] | None = None,
        slice_noise: str = "smooth",
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        precision: str = "auto",
    ) -> MMDiffSamplesOutput | tuple:
        """Synthesise ``targets`` from ``images``.

        Args:
            images: modality (or alias) -> a NIfTI path, or an array/tensor ``[H, W]`` or ``[X, Y, Z]``
                (axial slices along the last axis); all on one grid.
            dataset: the site's dataset name, one of ``unet.config.dataset_names``; ``None`` or an
                unknown name (warns) use the null dataset.
            targets: modalities to synthesise; default: every modality of the model not given.
            num_inference_steps: denoising steps per sample (6 by default: the posterior-mean image does not
                depend on them, and the calibrated uncertainty was as good at 6 as at 10; BENCHMARKS.md).
            generator: a generator, or a list with one per axial slice; makes the output reproducible
                (a slice gets the same noise whatever ``batch_size``).
            slice_noise: with one generator (or none), how the axial slices' noise relates:
                ``"smooth"`` (correlated over about one slice either side, :class:`SmoothSliceNoise`: a
                sample looks like one volume in every plane), ``"shared"`` (the same on every slice) or
                ``"independent"``;
                see :func:`slice_generators`. A list of generators is used as given (one per slice); a
                2D input draws what the generator would in any mode.
            num_samples: residual samples per slice (K; default: :attr:`default_num_samples`, the K the
                uncertainty was calibrated at). With K > 1, ``uncertainty`` holds their
                per-voxel std (with an ``error_model``, combined with its error scale, and then with
                K = 1 too) times the target's calibrated scale (:meth:`interval_scale_for`). With
                K = 1, the posterior-mean point estimate and no ``return_samples``, only the first
                denoising step runs (the point estimate needs no sample): one predictor pass plus one
                UNet pass per slice.
            output_type: ``"np"``, ``"pt"`` or ``"nifti"`` (NIfTI inputs, or 3D arrays with ``affine``).
            brain_mask: like the inputs; default: derived from them.
            batch_size: slices per network call.
            affine: voxel-to-world matrix of array inputs, for ``output_type="nifti"``.
            return_dict: return :class:`MMDiffSamplesOutput`, else ``(images, uncertainty, mask)``
                (and ``samples`` last with ``return_samples``).
            return_samples: also return the K individual samples per target.
            point_estimate: ``"posterior_mean"`` or ``"sample_mean"`` (see :func:`point_and_spread`);
                default: the pipeline config's.
            slices: synthesise only these axial slices (indices along the last axis; the others come back
                as 0): a quick look at part of a volume, or scoring every k-th slice. A 2.5D predictor
                still reads their neighbours.
            callback_on_step_end: ``callback(pipe, step_index, timestep, callback_kwargs) -> dict``
                after each denoising step (diffusers' convention); ``callback_kwargs["latents"]`` is the
                current batch's scaled residual latents, and a returned ``"latents"`` replaces them. Set
                ``pipe._interrupt = True`` in it to stop: the remaining steps and slices are skipped
                (slices not run come back as 0).
            precision: the networks' precision: ``"auto"`` (bf16 autocast on a CPU with native bf16,
                else float32), ``"float32"`` or ``"bfloat16"``; see :mod:`mmdiff.pipelines.precision`.

        Returns:
            Synthetic images in the model's normalised [0, 1] scale, zero outside the brain, on the
            input's grid (see :mod:`mmdiff.pipelines.common`).
        """
        num_samples = self.default_num_samples if num_samples is None else int(num_samples)
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        if slice_noise not in SLICE_NOISE:
            raise ValueError(f"slice_noise must be one of {', '.join(SLICE_NOISE)}, got {slice_noise!r}")
        unknown = set(callback_on_step_end_tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {sorted(unknown)} are not in "
                             f"{self._callback_tensor_inputs}")
        self._interrupt = False
        case = prepare_inputs(images, self.unet.config.modalities, targets, brain_mask, self.downsampling,
                              output_type, affine, self.preprocessor).only(slices)
        dataset_id = resolve_dataset_id(dataset, self.unet.config.dataset_names)
        device = self._execution_device
        precision = resolve_precision(precision, device)
        target_index = np.flatnonzero(case.target_mask).tolist()
        point = case.canvas()
        error_model = getattr(self, "error_model", None)
        sources = torch.as_tensor(case.source_mask, device=device)
        spread = case.canvas() if num_samples > 1 or error_model is not None else None
        samples = [case.canvas() for _ in range(num_samples)] if return_samples else None
        site = self.unet.config.dataset_names[dataset_id] if dataset_id >= 0 else None  # the model's own spelling
        scale = torch.tensor([self.interval_scale_for(self.modalities[m], site, int(case.source_mask.sum()))
                              for m in target_index],
                             device=device, dtype=self.unet.dtype)[None, :, None, None]
        point_estimate = point_estimate or self.config.point_estimate
        first_only = num_samples == 1 and point_estimate == "posterior_mean" and not return_samples
        weight = self.residual_weight(num_samples)

        callback = None
        if callback_on_step_end is not None:
            def callback(index, t, latents):
                kwargs = {"latents": latents} if "latents" in callback_on_step_end_tensor_inputs else {}
                return callback_on_step_end(self, index, t, kwargs).get("latents")

        smooth = None
        if not isinstance(generator, list):
            if slice_noise == "smooth" and case.num_slices > 1:  # one slice draws what the generator would
                smooth = SmoothSliceNoise(draw_seed(generator), num_samples)
            generator = slice_generators(generator, case.num_slices, slice_noise)
        with self.progress_bar(total=case.num_batches(batch_size)) as progress_bar:
            for index, batch, batch_generator in case.batches(batch_size, generator):
                if self.interrupt:
                    break
                batch = to_network(batch.to(device=device, dtype=self.unet.dtype))
                k = self.context_slices
                context = to_network(case.context(index, k).to(device=device, dtype=self.unet.dtype)) if k else None
                mu, residuals, posteriors = sample_residuals(
                    self.predictor, self.vae, self.unet, self.scheduler, batch,
                    sources, dataset_id, num_samples, num_inference_steps,
                    batch_generator, callback, lambda: self.interrupt, first_only, context,
                    None if smooth is None else lambda shape, index=index: smooth(index, shape[1:]), precision,
                    case.brain_batch(index))
                scale_b = error_scale(error_model, batch, mu, sources, dataset_id, precision)
                # only the targets from here on (the pooled spread of every sequence cost seconds a volume)
                mu, residuals = mu[:, target_index], residuals[:, :, target_index]
                scale_b = None if scale_b is None else scale_b[:, target_index]
                posteriors = None if posteriors is None else posteriors[:, :, target_index]
                mean, std = point_and_spread(mu, residuals, posteriors, point_estimate, weight,
                                             self.config.uncertainty_window)
                std = combined_spread(std, scale_b)
                case.put(point, index, from_network(mean))
                if spread is not None:
                    case.put(spread, index, std * (scale / 2))  # [-1, 1] -> [0, 1] units
                for k, canvas in enumerate(samples or []):
                    case.put(canvas, index, from_network(mu + residuals[k]))
                progress_bar.update()
        self.maybe_free_model_hooks()
        output = case.output(point, spread, return_dict=True)
        per_sample = None
        if samples is not None:
            per_sample = {name: [] for name in output.images}
            for canvas in samples:
                for name, image in case.output(canvas, None, return_dict=True).images.items():
                    per_sample[name].append(image)
        if not return_dict:
            return (output.images, output.uncertainty, output.mask) + ((per_sample,) if return_samples else ())
        return MMDiffSamplesOutput(images=output.images, uncertainty=output.uncertainty, mask=output.mask,
                                   samples=per_sample)
