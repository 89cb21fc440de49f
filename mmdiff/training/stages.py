"""The three training stages. Each builds its models and optimizers, takes one training step on a
homogeneous MCBS batch, predicts for validation, and exports what a pipeline loads.

Images arrive in [0, 1] (the cache's units); networks see ``x * 2 - 1``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler
from monai.networks.nets import PatchDiscriminator

from ..data.conditions import SynthesisConditionSampler, loss_weights
from ..losses import (discriminator_loss, generator_loss, latent_diffusion_loss, lesion_pixel_weight, lsgan_loss,
                      vae_adversarial_loss, vae_loss)
from ..models import (ConditionalLatentUNet, ModalityDiscriminators, MultiModalGenerator, build_vae,
                      decode_modalities, drop_dataset_id, encode_modalities, measure_scaling_factor)
from ..models.vae import downsampling_factor
from ..pipelines import MMDiffPipeline, MMGANPipeline
from ..pipelines.common import from_network, to_network
from ..pipelines.ldm import sample_latents


def adam(params, train_cfg: dict) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=float(train_cfg["learning_rate"]), betas=tuple(train_cfg.get("betas", (0.9, 0.999))),
                             weight_decay=float(train_cfg.get("weight_decay", 0.0)))


class Stage:
    """What the trainer needs from a stage."""

    #: the model whose weights get an EMA copy and are validated
    main: str
    #: the cache's intensity rule (:class:`~mmdiff.data.preprocessing.MRIPreprocessor`), set by the
    #: trainer and exported with the pipeline
    preprocessor = None
    models: dict[str, torch.nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]

    def __init__(self, config: dict, dataset_names: list[str], modalities: list[str], device):
        self.config = config
        self.dataset_names = dataset_names
        self.modalities = modalities
        self.train_cfg = config["train"]
        self.device = device
        self.conditions = SynthesisConditionSampler(self.train_cfg.get("condition_mode", "random"),
                                                    modalities=modalities, seed=int(self.train_cfg.get("seed", 0)))

    def state_dict(self) -> dict:
        """Random state of the stage itself (the synthesis-condition draws), saved with checkpoints."""
        return {"conditions": self.conditions.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.conditions.generator.set_state(state["conditions"])

    def training_step(self, batch: dict, accelerator, step: int) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, images, sources, targets, dataset_id, generator=None) -> torch.Tensor:
        """Images ``[B, M, H, W]`` in [0, 1] for the ``targets`` given the ``sources``."""
        raise NotImplementedError

    def finish(self, loader, accelerator) -> None:
        """Work after the last step (e.g. measuring the VAE's latent scale)."""

    def export(self, models: dict[str, torch.nn.Module], out: Path) -> None:
        raise NotImplementedError

    def _dataset_ids(self, batch) -> torch.Tensor:
        ids = torch.as_tensor(batch["dataset_id"], device=self.device)
        return drop_dataset_id(ids, float(self.train_cfg.get("dataset_dropout", 0.1)))


class AutoencoderForward(torch.nn.Module):
    """``AutoencoderKL`` encode -> latent -> decode as one ``forward``: DDP only hooks ``forward``,
    and a wrapped module may run it once per backward pass."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, sample_posterior: bool = True):
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample_posterior else posterior.mode()
        return self.vae.decode(latents).sample, posterior


class VAEStage(Stage):
    """The shared single-channel VAE: L1 + SSIM + KL, and a PatchGAN term after a warm-up."""

    main = "vae"

    def __init__(self, config, dataset_names, modalities, device):
        super().__init__(config, dataset_names, modalities, device)
        model_cfg = dict(config["model"])
        disc_cfg = model_cfg.pop("discriminator", {"channels": 32, "num_layers_d": 3})
        self.loss_cfg = model_cfg.pop("loss", {})
        self.models = {"vae": AutoencoderForward(build_vae(**model_cfg)),
                       "discriminator": PatchDiscriminator(spatial_dims=2, in_channels=1, **disc_cfg)}
        self.optimizers = {"vae": adam(self.models["vae"].parameters(), self.train_cfg),
                           "discriminator": adam(self.models["discriminator"].parameters(), self.train_cfg)}
        self.images_per_step = int(self.train_cfg.get("images_per_step", 16))

    def _images(self, batch) -> torch.Tensor:
        """The available sequences of a batch as one-channel images ``[N, 1, H, W]``, at most ``images_per_step``."""
        images = to_network(batch["images"])[batch["available"]]
        return images[: self.images_per_step, None]

    def training_step(self, batch, accelerator, step):
        vae, disc = self.models["vae"], self.models["discriminator"]
        x = self._images(batch)
        start = int(self.loss_cfg.get("adversarial_start", 1000))
        adversarial_on = step >= start
        with accelerator.accumulate(vae, disc):
            recon, posterior = vae(x)
            terms = vae_loss(recon, x, posterior, kl_weight=float(self.loss_cfg.get("kl_weight", 1e-6)),
                             ssim_weight=float(self.loss_cfg.get("ssim_weight", 0.5)))
            loss = terms["loss"]
            if adversarial_on:
                terms["adversarial"] = vae_adversarial_loss(disc(recon)[-1], step, start,
                                                            float(self.loss_cfg.get("adversarial_weight", 0.01)))
                loss = loss + terms["adversarial"]
            accelerator.backward(loss)
            self._clip(accelerator, vae)
            self.optimizers["vae"].step()
            self.optimizers["vae"].zero_grad(set_to_none=True)
            logs = {k: v.item() for k, v in terms.items()}
            if adversarial_on:  # real and fake in one call (one forward per backward, for DDP)
                logits = disc(torch.cat([x, recon.detach()]))[-1]
                d_loss = 0.5 * (lsgan_loss(logits[: len(x)], True) + lsgan_loss(logits[len(x):], False))
                accelerator.backward(d_loss)
                logs["discriminator"] = d_loss.item()
            self.optimizers["discriminator"].step()  # no gradients during the warm-up: a no-op
            self.optimizers["discriminator"].zero_grad(set_to_none=True)
        return logs

    def _clip(self, accelerator, model):
        if accelerator.sync_gradients and self.train_cfg.get("grad_clip"):
            accelerator.clip_grad_norm_(model.parameters(), float(self.train_cfg["grad_clip"]))

    @torch.no_grad()
    def predict(self, images, sources, targets, dataset_id, generator=None):
        batch, modalities, height, width = images.shape
        flat = to_network(images).reshape(batch * modalities, 1, height, width)
        recon, _ = self.models["vae"](flat, sample_posterior=False)
        return from_network(recon.reshape(batch, modalities, height, width))

    def finish(self, loader, accelerator):
        vae = accelerator.unwrap_model(self.models["vae"]).vae
        batches = []
        for i, batch in enumerate(loader):
            if i >= int(self.train_cfg.get("scale_batches", 8)):
                break
            batches.append((to_network(batch["images"]), batch["available"]))
        vae.register_to_config(scaling_factor=measure_scaling_factor(vae, batches))

    def export(self, models, out):
        models["vae"].vae.save_pretrained(out / "vae")


def load_vae(path: str | Path, device) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path).to(device).eval().requires_grad_(False)
    if vae.config.scaling_factor == 1.0:
        raise ValueError(f"{path}: the VAE's scaling factor was never measured; train it with the vae stage")
    return vae


class LDMStage(Stage):
    """The conditional latent diffusion UNet on the frozen VAE's latents, selective supervision."""

    main = "unet"

    def __init__(self, config, dataset_names, modalities, device, vae_path: Path):
        super().__init__(config, dataset_names, modalities, device)
        model_cfg = dict(config["model"])
        scheduler_cfg = model_cfg.pop("scheduler", {})
        self.sampling_steps = int(model_cfg.pop("validation_steps", 10))
        model_cfg.pop("vae", None)
        self.vae = load_vae(vae_path, device)
        self.factor = downsampling_factor(self.vae)
        self.scheduler = DDPMScheduler(**{"num_train_timesteps": 1000, "beta_schedule": "scaled_linear",
                                          "beta_start": 0.00085, "beta_end": 0.012,
                                          "prediction_type": "epsilon", **scheduler_cfg})
        self.models = {"unet": ConditionalLatentUNet(modalities=modalities, num_datasets=len(dataset_names),
                                                      dataset_names=dataset_names,
                                                      latent_channels=self.vae.config.latent_channels, **model_cfg)}
        self.optimizers = {"unet": adam(self.models["unet"].parameters(), self.train_cfg)}

    @torch.no_grad()
    def _latents(self, images, available):
        """Latents ``[B, M, C, h, w]`` of the available sequences (zero where missing); one VAE pass."""
        mask = available[0]  # MCBS batches share one availability mask
        present = encode_modalities(self.vae, to_network(images[:, mask]))
        latents = present.new_zeros(images.shape[0], images.shape[1], *present.shape[2:])
        latents[:, mask] = present
        return latents

    def training_step(self, batch, accelerator, step):
        unet = self.models["unet"]
        available = batch["available"]
        latents = self._latents(batch["images"], available)
        sources, _ = self.conditions.batch(available.cpu())
        sources = sources.to(latents.device)
        targets, _ = loss_weights(available, sources)  # (1 - sc) * m: the sequences to synthesize
        noise = torch.randn_like(latents)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t) * targets[:, :, None, None, None]
        if self.scheduler.config.prediction_type == "v_prediction":
            objective = self.scheduler.get_velocity(latents, noise, t)
        else:
            objective = noise
        with accelerator.accumulate(unet):
            pred = unet(noisy, t, latents, sources.float(), self._dataset_ids(batch)).sample
            loss = latent_diffusion_loss(pred, objective, targets)
            accelerator.backward(loss)
            if accelerator.sync_gradients and self.train_cfg.get("grad_clip"):
                accelerator.clip_grad_norm_(unet.parameters(), float(self.train_cfg["grad_clip"]))
            self.optimizers["unet"].step()
            self.optimizers["unet"].zero_grad(set_to_none=True)
        return {"loss": loss.item()}

    @torch.no_grad()
    def predict(self, images, sources, targets, dataset_id, generator=None):
        source_latents = self._latents(images, sources)
        sampled = sample_latents(self.models["unet"], DPMSolverMultistepScheduler.from_config(self.scheduler.config),
                                 source_latents, sources, targets, dataset_id, self.sampling_steps, generator)
        latents = torch.where(targets[:, :, None, None, None], sampled, source_latents)
        return from_network(decode_modalities(self.vae, latents))

    def export(self, models, out):
        MMDiffPipeline(vae=self.vae, unet=models["unet"], scheduler=self.scheduler).save_pretrained(out)


class GANStage(Stage):
    """The one-step fast path: multi-stream generator, one PatchGAN per modality, PMM-Synth's losses."""

    main = "generator"

    def __init__(self, config, dataset_names, modalities, device):
        super().__init__(config, dataset_names, modalities, device)
        model_cfg = dict(config["model"])
        disc_cfg = model_cfg.pop("discriminator", {})
        self.lambdas = model_cfg.pop("lambdas", {"lambda_syn": 100.0, "lambda_rec": 30.0, "lambda_adv": 1.0})
        self.lesion_weight = float(model_cfg.pop("lesion_weight", 0.0))
        self.models = {
            "generator": MultiModalGenerator(modalities=modalities, num_datasets=len(dataset_names),
                                             dataset_names=dataset_names, **model_cfg),
            "discriminators": ModalityDiscriminators(modalities=modalities, **disc_cfg),
        }
        self.optimizers = {name: adam(model.parameters(), self.train_cfg) for name, model in self.models.items()}

    def training_step(self, batch, accelerator, step):
        generator, discriminators = self.models["generator"], self.models["discriminators"]
        x = to_network(batch["images"])
        available = batch["available"]
        sources, _ = self.conditions.batch(available.cpu())
        sources = sources.to(x.device)
        synthesis_w, reconstruction_w = loss_weights(available, sources)
        inputs = x * sources[:, :, None, None]
        context = to_network(batch["context"]) if "context" in batch else None
        pixel_weight = lesion_pixel_weight(batch["seg"], self.lesion_weight) if self.lesion_weight else None
        with accelerator.accumulate(generator, discriminators):
            fake = generator(inputs, sources, self._dataset_ids(batch), context=context)
            targets = (synthesis_w[0] > 0).nonzero().flatten().tolist()  # one condition per batch
            logs = {}
            if targets:  # real and fake in one discriminator call (one forward per backward, for DDP)
                both = discriminators(torch.cat([inputs, inputs]),
                                      torch.cat([x[:, targets], fake[:, targets].detach()]), targets)
                batch_size = x.shape[0]
                d_terms = discriminator_loss({m: v[:batch_size] for m, v in both.items()},
                                             {m: v[batch_size:] for m, v in both.items()}, synthesis_w)
                accelerator.backward(d_terms["loss"])
                logs["discriminator"] = d_terms["loss"].item()
            self.optimizers["discriminators"].step()  # a no-op without targets (no gradients)
            self.optimizers["discriminators"].zero_grad(set_to_none=True)
            fake_logits = discriminators(inputs, fake[:, targets], targets) if targets else {}
            g_terms = generator_loss(fake, x, synthesis_w, reconstruction_w, fake_logits or None,
                                     **{k: float(v) for k, v in self.lambdas.items()}, pixel_weight=pixel_weight)
            accelerator.backward(g_terms["loss"])
            if accelerator.sync_gradients and self.train_cfg.get("grad_clip"):
                accelerator.clip_grad_norm_(generator.parameters(), float(self.train_cfg["grad_clip"]))
            self.optimizers["generator"].step()
            self.optimizers["generator"].zero_grad(set_to_none=True)
            self.optimizers["discriminators"].zero_grad(set_to_none=True)
        return logs | {k: v.item() for k, v in g_terms.items()}

    @torch.no_grad()
    def predict(self, images, sources, targets, dataset_id, generator=None, context=None):
        x = to_network(images) * sources[:, :, None, None]
        context = None if context is None else to_network(context)
        return from_network(self.models["generator"](x, sources, dataset_id, context=context))

    def export(self, models, out):
        MMGANPipeline(generator=models["generator"], preprocessor=self.preprocessor).save_pretrained(out)


STAGES = {"vae": VAEStage, "ldm": LDMStage, "gan": GANStage}
