"""The latent diffusion pipeline: sample the missing sequences' latents given the others."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, DDPMScheduler, DiffusionPipeline, DPMSolverMultistepScheduler,
                       EulerDiscreteScheduler, UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

from ..models.unet import ConditionalLatentUNet
from ..models.vae import decode_modalities, downsampling_factor, encode_modalities
from .common import ImageInput, MMDiffPipelineOutput, from_network, prepare_inputs, resolve_dataset_id, to_network

logger = logging.get_logger(__name__)

#: schedulers by the names ``mmdiff synthesize/evaluate --scheduler`` take; any other diffusers scheduler
#: can be assigned to ``pipe.scheduler`` directly.
SCHEDULERS = {"dpm++": DPMSolverMultistepScheduler, "unipc": UniPCMultistepScheduler, "ddim": DDIMScheduler,
              "euler": EulerDiscreteScheduler, "ddpm": DDPMScheduler}


def use_scheduler(pipe: "MMDiffPipeline", name: str) -> None:
    """Give ``pipe`` the scheduler called ``name`` (see :data:`SCHEDULERS`), built from its scheduler's config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}: choose one of {', '.join(SCHEDULERS)}")
    pipe.scheduler = SCHEDULERS[name].from_config(pipe.scheduler.config)


def sample_latents(
    unet: ConditionalLatentUNet,
    scheduler: SchedulerMixin,
    source_latents: torch.Tensor,
    sources: torch.Tensor | np.ndarray,
    targets: torch.Tensor | np.ndarray,
    dataset_id: torch.Tensor | int,
    num_inference_steps: int,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Sample the target latents given clean source latents (the LDM's reverse process).

    Noise is drawn and denoised only in the target channels; the sources stay clean conditions.

    Args:
        source_latents: ``[B, M, C, h, w]`` scaled latents (non-sources are ignored).
        sources, targets: bool ``[M]`` or ``[B, M]``.
        dataset_id: an int or ``[B]`` (``-1``: null).
        num_inference_steps: passed to ``scheduler.set_timesteps`` (this resets the scheduler).
        generator: one generator, or one per batch item.

    Returns:
        ``[B, M, C, h, w]``: sampled latents in the target channels, zero elsewhere.
    """
    batch, device, dtype = source_latents.shape[0], source_latents.device, source_latents.dtype
    sources = torch.as_tensor(sources, device=device).bool().expand(batch, -1)
    target_planes = torch.as_tensor(targets, device=device).bool().expand(batch, -1)[:, :, None, None, None].to(dtype)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}

    scheduler.set_timesteps(num_inference_steps, device=device)
    latents = randn_tensor(source_latents.shape, generator=generator, device=device, dtype=dtype)
    latents = latents * scheduler.init_noise_sigma * target_planes
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents.flatten(1, 2), t).view_as(latents)
        prediction = unet(model_input, t.expand(batch), source_latents, sources, dataset_id).sample
        latents = scheduler.step(prediction.flatten(1, 2), t, latents.flatten(1, 2), **step_kwargs).prev_sample
        latents = latents.view_as(source_latents) * target_planes
    return latents


class MMDiffPipeline(DiffusionPipeline):
    """Synthesise missing MRI sequences with the dataset-aware conditional latent diffusion model.

    Args:
        vae: the shared single-channel ``AutoencoderKL``.
        unet: the :class:`~mmdiff.models.ConditionalLatentUNet`.
        scheduler: any diffusers scheduler. A ``DDPMScheduler`` (the training scheduler, which the
            training export saves) is replaced here by ``DPMSolverMultistepScheduler`` (DPM-Solver++)
            with the same config, which is good at ~20 steps; any other scheduler is kept, and so is
            one assigned later (``pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)``).
    """

    engine = "ldm"
    model_cpu_offload_seq = "vae->unet"

    def __init__(self, vae: AutoencoderKL, unet: ConditionalLatentUNet, scheduler: SchedulerMixin):
        super().__init__()
        if type(scheduler) is DDPMScheduler:
            logger.info("DDPMScheduler replaced by DPMSolverMultistepScheduler for few-step sampling")
            scheduler = DPMSolverMultistepScheduler.from_config(scheduler.config)
        self.register_modules(vae=vae, unet=unet, scheduler=scheduler)

    @property
    def downsampling(self) -> int:
        """How much the VAE and the UNet together shrink a slice side."""
        return downsampling_factor(self.vae) * 2 ** (len(self.unet.config.block_out_channels) - 1)

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
        num_inference_steps: int = 20,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_samples: int = 1,
        output_type: str = "np",
        brain_mask: ImageInput | None = None,
        batch_size: int = 8,
        affine: np.ndarray | None = None,
        return_dict: bool = True,
    ) -> MMDiffPipelineOutput | tuple:
        """Synthesise ``targets`` from ``images``.

        Args:
            images: modality (or alias) -> a NIfTI path, or an array/tensor ``[H, W]`` or ``[X, Y, Z]``
                (axial slices along the last axis); all on one grid.
            dataset: the site's dataset name, one of ``unet.config.dataset_names``; ``None`` or an
                unknown name (warns) use the null dataset.
            targets: modalities to synthesise; default: every modality of the model not given.
            num_inference_steps: denoising steps.
            generator: a generator, or a list with one per axial slice (the same slice then gets the
                same noise whatever ``batch_size``); makes the output reproducible.
            num_samples: samples per slice; the output is their mean, and with more than one
                ``uncertainty`` holds their per-voxel standard deviation.
            output_type: ``"np"``, ``"pt"`` or ``"nifti"`` (NIfTI inputs, or 3D arrays with ``affine``).
            brain_mask: like the inputs; default: derived from them.
            batch_size: slices per network call.
            affine: voxel-to-world matrix of array inputs, for ``output_type="nifti"``.
            return_dict: return :class:`MMDiffPipelineOutput`, else ``(images, uncertainty, mask)``.

        Returns:
            Synthetic images in the model's normalised [0, 1] scale, zero outside the brain, on the
            input's grid (see :mod:`mmdiff.pipelines.common`).
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}")
        case = prepare_inputs(images, self.unet.config.modalities, targets, brain_mask, self.downsampling,
                              output_type, affine)
        dataset_id = resolve_dataset_id(dataset, self.unet.config.dataset_names)
        device = self._execution_device
        source_index = np.flatnonzero(case.source_mask).tolist()
        target_index = np.flatnonzero(case.target_mask).tolist()
        mean, std = case.canvas(), case.canvas() if num_samples > 1 else None

        with self.progress_bar(total=case.num_batches(batch_size) * num_samples) as progress_bar:
            for index, batch, batch_generator in case.batches(batch_size, generator):
                batch = batch.to(device=device, dtype=self.vae.dtype)
                encoded = encode_modalities(self.vae, to_network(batch[:, source_index]))
                source_latents = encoded.new_zeros(batch.shape[:2] + encoded.shape[2:])
                source_latents[:, source_index] = encoded
                samples = []
                for _ in range(num_samples):
                    latents = sample_latents(self.unet, self.scheduler, source_latents, case.source_mask,
                                             case.target_mask, dataset_id, num_inference_steps, batch_generator)
                    samples.append(from_network(decode_modalities(self.vae, latents[:, target_index])))
                    progress_bar.update()
                samples = torch.stack(samples)
                case.put(mean, index, samples.mean(0))
                if std is not None:
                    case.put(std, index, samples.std(0))
        self.maybe_free_model_hooks()
        return case.output(mean, std, return_dict)
