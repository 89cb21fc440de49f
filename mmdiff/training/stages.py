"""The three training stages. Each builds its models and optimizers, takes one training step on a
homogeneous MCBS batch, predicts for validation, and exports what a pipeline loads.

Images arrive in [0, 1] (the cache's units); networks see ``x * 2 - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import DDPMScheduler
from monai.networks.nets import PatchDiscriminator

from ..data.conditions import SynthesisConditionSampler, loss_weights
from ..data.contrast import check_source_gamma, draw_gammas, raise_to
from ..modalities import UnknownModalityError, canonical
from ..losses import (dataset_lesion_pixel_weight, discriminator_loss, generator_loss, lesion_pixel_weight, lsgan_loss,
                      vae_adversarial_loss, vae_loss)
from ..models import (ErrorScaleNet, HaarWavelet, ModalityDiscriminators, MultiModalGenerator, ResidualUNet,
                      build_vae, diffusion_loss, drop_dataset_id, encode_modalities, laplace_nll, latent_channels,
                      measure_scaling_factor)
from ..pipelines import MMDiffPipeline, MMGANPipeline
from ..pipelines.common import from_network, inside_brain, to_network
from ..pipelines.ldm import (DEFAULT_NUM_SAMPLES, DEFAULT_UNCERTAINTY_WINDOW, SCHEDULERS, TRAINING_SCHEDULER,
                           Calibration, calibrate, point_and_spread, predictor_mean_inside_brain, sample_residuals)
from .config import ConfigError


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
    #: whether the stage changes its sources' contrast in training (``train.source_gamma``,
    #: :mod:`mmdiff.data.contrast`); another stage refuses the setting rather than ignore it
    takes_source_gamma = False
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
        try:
            self.source_gamma = check_source_gamma(self.train_cfg.get("source_gamma"))
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        dropped_from = self.train_cfg.get("dataset_dropout_from")  # None: every dataset's id may be dropped
        if dropped_from is not None and not isinstance(dropped_from, (list, tuple)):
            raise ConfigError(f"train.dataset_dropout_from must be null or a list of dataset names, e.g. "
                              f"[brats, ms], got {dropped_from!r}")
        unknown = sorted(set(dropped_from or ()) - set(dataset_names))
        if unknown:
            raise ConfigError(f"train.dataset_dropout_from names {unknown}, not datasets of this run "
                              f"(it has {dataset_names})")
        self._droppable = None if dropped_from is None else [dataset_names.index(n) for n in dropped_from]
        if self.source_gamma is not None and not self.takes_source_gamma:
            raise ConfigError(f"train.source_gamma is for the gan stage; the {config.get('stage')} stage does not "
                              "change its sources (set it to null)")

    def state_dict(self) -> dict:
        """Random state of the stage itself (the synthesis-condition draws), saved with checkpoints."""
        return {"conditions": self.conditions.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.conditions.generator.set_state(state["conditions"])

    def training_step(self, batch: dict, accelerator, step: int) -> dict[str, float]:
        raise NotImplementedError

    def predict(self, images, sources, targets, dataset_id, generator=None, brain=None) -> torch.Tensor:
        """Images ``[B, M, H, W]`` in [0, 1] for the ``targets`` given the ``sources`` (``brain``: the
        slices' brain masks ``[B, H, W]``, for a model that needs them)."""
        raise NotImplementedError

    def finish(self, loader, accelerator) -> None:
        """Work after the last step (e.g. measuring the VAE's latent scale)."""

    def export(self, models: dict[str, torch.nn.Module], out: Path) -> None:
        raise NotImplementedError

    def _clip(self, accelerator, model) -> None:
        """Clip ``model``'s gradient norm to ``train.grad_clip`` on the steps that apply them."""
        if accelerator.sync_gradients and self.train_cfg.get("grad_clip"):
            accelerator.clip_grad_norm_(model.parameters(), float(self.train_cfg["grad_clip"]))

    def _dataset_ids(self, batch) -> torch.Tensor:
        ids = torch.as_tensor(batch["dataset_id"], device=self.device)
        return drop_dataset_id(ids, float(self.train_cfg.get("dataset_dropout", 0.1)), only=self._droppable)


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
            terms = vae_loss(recon, x, posterior, kl_weight=float(self.loss_cfg.get("kl_weight", 1e-8)),
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

    @torch.no_grad()
    def predict(self, images, sources, targets, dataset_id, generator=None, brain=None):
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


def load_predictor(path: str | Path, device) -> MultiModalGenerator:
    """The one-step predictor from a pipeline folder (its ``generator/``) or a generator folder, frozen."""
    path = Path(path)
    folder = path / "generator" if (path / "model_index.json").exists() else path
    if not (folder / "config.json").exists():
        raise ConfigError(f"model.predictor.path {path} is neither a pipeline folder nor a generator folder")
    return MultiModalGenerator.from_pretrained(folder).to(device).eval().requires_grad_(False)


class LDMStage(Stage):
    """Residual diffusion on a frozen one-step predictor, in a frozen latent (the Haar wavelet by default).

    The UNet learns ``latent(y) - latent(mu)`` for the synthesised sequences with ground truth
    (selective supervision, :func:`~mmdiff.models.unet.diffusion_loss`); validation and calibration
    sample through :func:`~mmdiff.pipelines.ldm.sample_residuals`, the pipeline's own maths, each row
    conditioned on its own sources. The export fits the uncertainty's interval scale on the validation
    slices with the exported (EMA) weights and stores it in the pipeline config.
    """

    main = "unet"

    def __init__(self, config, dataset_names, modalities, device, predictor_path: Path, vae_path: Path | None = None,
                 validation: list[dict] | None = None):
        super().__init__(config, dataset_names, modalities, device)
        model_cfg = dict(config["model"])
        model_cfg.pop("predictor", None)
        latent_cfg = dict(model_cfg.pop("latent", None) or {"type": "wavelet", "levels": 2})
        self.sampler_name = model_cfg.pop("sampler", "dpm++")
        self.sampling_steps = int(model_cfg.pop("validation_steps", 10))
        self.validation_count = int(model_cfg.pop("validation_samples", 2))
        self.point_estimate = model_cfg.pop("point_estimate", "posterior_mean")
        error_cfg = model_cfg.pop("error_model", None)  # {channels, num_layers}; null: samples' spread only
        # false: the UNet is kept as loaded and only the error model learns (refitting it, e.g. with a
        # lesion weight, costs a predictor pass a step instead of a UNet step)
        self.train_unet = bool(model_cfg.pop("train_unet", True))
        if not self.train_unet and error_cfg is None:
            raise ConfigError("model.train_unet: false trains the error model alone, but model.error_model is null")
        self.error_lesion_weight = 0.0
        calibration = dict(model_cfg.pop("calibration", None) or {})
        self.coverage = float(calibration.get("coverage", 0.9))
        # the interval scale holds for the K it is fitted at: by default the pipeline's own default K
        self.calibration_count = int(calibration.get("samples") or DEFAULT_NUM_SAMPLES)
        self.uncertainty_window = int(calibration.get("window") or DEFAULT_UNCERTAINTY_WINDOW)
        self.calibration_slices = validation or []
        self.scheduler = DDPMScheduler(**{**TRAINING_SCHEDULER, **model_cfg.pop("scheduler", {})})
        self.sampler = SCHEDULERS[self.sampler_name].from_config(self.scheduler.config)

        self.predictor = load_predictor(predictor_path, device)
        predictor_names = list(self.predictor.config.dataset_names or [])
        unknown = [name for name in dataset_names if name not in predictor_names]
        if unknown:
            raise ConfigError(f"the predictor does not know the datasets {unknown} (it knows {predictor_names})")
        if list(self.predictor.config.modalities) != list(modalities):
            raise ConfigError(f"the predictor's modalities {self.predictor.config.modalities} differ from the "
                              f"data's {modalities}")
        # training ids -> the predictor's ids, which the UNet and the pipeline share; -1 (null) stays -1
        self.id_map = torch.tensor([predictor_names.index(name) for name in dataset_names] + [-1], device=device)
        if latent_cfg.get("type", "wavelet") == "wavelet":
            self.vae = HaarWavelet(levels=int(latent_cfg.get("levels", 2))).to(device)
        elif latent_cfg["type"] == "vae":
            self.vae = load_vae(vae_path, device)
        else:
            raise ConfigError(f"model.latent.type must be wavelet or vae, got {latent_cfg['type']!r}")
        self.models = {"unet": ResidualUNet(modalities=modalities, num_datasets=len(predictor_names),
                                            dataset_names=predictor_names, latent_channels=latent_channels(self.vae),
                                            **model_cfg)}
        self.optimizers = {"unet": adam(self.models["unet"].parameters(), self.train_cfg)}
        if error_cfg is not None:  # a small network: its own (by default the UNet's) learning rate
            error_cfg = dict(error_cfg) if isinstance(error_cfg, dict) else {}
            lr = error_cfg.pop("learning_rate", None)
            # extra weight of lesion pixels in the error model's likelihood (see ``training_step``)
            self.error_lesion_weight = lesion_weight_config(error_cfg.pop("lesion_weight", 0.0))
            self.models["error_model"] = ErrorScaleNet(modalities=modalities, num_datasets=len(predictor_names),
                                                       dataset_names=predictor_names, **error_cfg)
            self.optimizers["error_model"] = adam(self.models["error_model"].parameters(),
                                                  self.train_cfg | ({"learning_rate": lr} if lr is not None else {}))

    def _predictor_ids(self, dataset_id) -> torch.Tensor:
        return self.id_map[torch.as_tensor(dataset_id, device=self.id_map.device).long()]

    def training_step(self, batch, accelerator, step):
        unet = self.models["unet"]
        x = to_network(batch["images"])
        available = batch["available"]
        sources, _ = self.conditions.batch(available.cpu())
        sources = sources.to(x.device)
        weight, _ = loss_weights(available, sources)  # (1 - sc) * m: synthesised, with ground truth
        dataset_id = self._predictor_ids(self._dataset_ids(batch))
        context = to_network(batch["context"]) if "context" in batch else None  # a 2.5D predictor's
        with torch.no_grad():
            mu = predictor_mean_inside_brain(self.predictor, self.predictor(x, sources, dataset_id, context=context),
                                             batch["brain_mask"])
        logs = {}
        if self.train_unet:
            with torch.no_grad():
                mu_latents = encode_modalities(self.vae, mu)
                latents = encode_modalities(self.vae, x)
                condition = torch.where(sources[:, :, None, None, None], latents, mu_latents)
            with accelerator.accumulate(unet):
                loss = diffusion_loss(unet, self.scheduler, latents - mu_latents, condition, sources, weight,
                                      dataset_id)
                accelerator.backward(loss)
                self._clip(accelerator, unet)
                self.optimizers["unet"].step()
                self.optimizers["unet"].zero_grad(set_to_none=True)
            logs["loss"] = loss.item()
        if "error_model" in self.models:  # the predictor's error scale, on the same mu (its own optimiser)
            error_model = self.models["error_model"]
            with accelerator.accumulate(error_model):
                log_scale = error_model(torch.where(sources[:, :, None, None], x, mu), sources, dataset_id)
                # the likelihood is a proper scoring rule: weighting lesion pixels up leaves each pixel's
                # optimum at b = E|e| and makes the small network spend itself where lesions are (its
                # lesion errors were under-stated: held-out lesion coverage 0.68 for 0.90; weights 4 and 16
                # did not change that, BENCHMARKS.md session 14, so 0 by default)
                pixels = batch["brain_mask"].to(x.device)
                if self.error_lesion_weight:
                    pixels = pixels * lesion_pixel_weight(batch["seg"].to(x.device), self.error_lesion_weight)
                nll = laplace_nll(log_scale, x - mu, weight, pixels)
                accelerator.backward(nll)
                self._clip(accelerator, error_model)
                self.optimizers["error_model"].step()
                self.optimizers["error_model"].zero_grad(set_to_none=True)
            logs["error_nll"] = nll.item()
        return logs

    @torch.no_grad()
    def predict(self, images, sources, targets, dataset_id, generator=None, context=None, brain=None):
        """The pipeline's point estimate (``model.point_estimate`` over ``model.validation_samples`` runs)."""
        mu, residuals, posteriors = sample_residuals(
            self.predictor, self.vae, accelerator_free(self.models["unet"]), self.sampler, to_network(images), sources,
            self._predictor_ids(dataset_id), self.validation_count, self.sampling_steps, generator,
            context=None if context is None else to_network(context), brain=brain)
        return from_network(point_and_spread(mu, residuals, posteriors, self.point_estimate)[0])

    def calibrate(self, unet, error_model=None) -> Calibration | None:
        """The residual weight and interval scale fitted on the validation slices (the conditions of
        :func:`~mmdiff.training.data.calibration_slices`, :func:`~mmdiff.pipelines.ldm.calibrate`),
        or None without any."""
        from .data import calibration_slices

        if not self.calibration_slices:
            return None
        slices = calibration_slices(self.calibration_slices, lambda i: int(self._predictor_ids(i)), seed=1,
                                    modalities=self.modalities)
        unet.eval()
        return calibrate(self.predictor, self.vae, unet, self.sampler, slices, self.calibration_count,
                         self.sampling_steps, self.coverage, self.point_estimate,
                         torch.Generator(device="cpu").manual_seed(1), uncertainty_window=self.uncertainty_window,
                         error_model=error_model)

    def export(self, models, out):
        unet, error_model = models["unet"], models.get("error_model")
        if error_model is not None:
            error_model.eval()
        fitted = self.calibrate(unet, error_model)
        MMDiffPipeline(vae=self.vae, unet=unet, scheduler=self.sampler, predictor=self.predictor,
                       coverage=self.coverage, point_estimate=self.point_estimate, preprocessor=self.preprocessor,
                       error_model=error_model,
                       **(fitted.pipeline_config() if fitted is not None else {})).save_pretrained(out)


def lesion_weight_config(value) -> float | dict[int, float]:
    """``model.lesion_weight``: one extra weight for every lesion label, or ``{label: extra weight}``."""
    if isinstance(value, dict):
        try:
            return {int(label): float(extra) for label, extra in value.items()}
        except (TypeError, ValueError):
            raise ConfigError(f"model.lesion_weight maps seg labels to weights, e.g. {{1: 4, 3: 16}}; got {value}") from None
    return float(value or 0.0)


def lambdas_config(value) -> dict[str, float]:
    """``model.lambdas``: the loss weights :func:`~mmdiff.losses.generator_loss` takes (its ``lambda_*``
    arguments, asked of the function itself), as floats; a name it does not take is refused before
    training, not at the first step."""
    import inspect

    from .. import losses  # the loss's own signature (not this module's name for it, which tests may wrap)

    known = [name for name in inspect.signature(losses.generator_loss).parameters if name.startswith("lambda_")]
    if not isinstance(value, dict):
        raise ConfigError(f"model.lambdas maps loss terms to weights ({', '.join(known)}); got {value!r}")
    unknown = sorted(str(name) for name in value if name not in known)
    if unknown:
        raise ConfigError(f"model.lambdas has {', '.join(unknown)}: the GAN's loss weights are {', '.join(known)}")
    try:
        return {name: float(weight) for name, weight in value.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"model.lambdas must map each term to a number; got {value!r}") from None


def dataset_lesion_weight_config(value, dataset_names: Sequence[str]) -> dict[int, float | dict[int, float]]:
    """``model.dataset_lesion_weight``: ``{dataset: lesion weight}`` (each as ``model.lesion_weight``)
    for the named datasets' images, in place of ``model.lesion_weight``; as ``{dataset id: weight}``."""
    if not value:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"model.dataset_lesion_weight maps datasets to lesion weights, e.g. "
                          f"{{brats: {{1: 24, 3: 32}}}}; got {value!r}")
    unknown = sorted(str(name) for name in value if name not in dataset_names)
    if unknown:
        raise ConfigError(f"model.dataset_lesion_weight names {', '.join(unknown)}, not among the datasets trained on "
                          f"({', '.join(dataset_names)})")
    return {list(dataset_names).index(name): lesion_weight_config(weight) for name, weight in value.items()}


def target_weight_config(value, modalities: Sequence[str]) -> torch.Tensor | None:
    """``model.target_weight``: ``{sequence: weight}`` of a target's synthesis loss (others 1), as a
    ``[M]`` tensor; None (or empty) for equal weights.

    Why: a batch's synthesis L1 is the mean over its targets, so a sequence whose one feature is rare
    and small (T1C's enhancement) gets a small share of the gradient. A network trained only on T1C
    learned the enhancement of held-out glioma phantoms in 75 steps, where thousands of mixed steps
    had not (BENCHMARKS.md, session 10).
    """
    if not value:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"model.target_weight maps sequences to weights, e.g. {{t1c: 3}}; got {value!r}")
    weights = torch.ones(len(modalities))
    for name, weight in value.items():
        try:
            key = canonical(str(name), modalities)
        except UnknownModalityError:
            raise ConfigError(f"model.target_weight names {name!r}, which the model does not know "
                              f"({', '.join(modalities)})") from None
        if float(weight) <= 0:
            raise ConfigError(f"model.target_weight[{name}] must be positive, got {weight}")
        weights[list(modalities).index(key)] = float(weight)
    return weights


def accelerator_free(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a DDP wrapper (its config is needed for sampling); the model itself otherwise."""
    return getattr(model, "module", model)


class GANStage(Stage):
    """The one-step fast path: multi-stream generator, one PatchGAN per modality, PMM-Synth's losses."""

    main = "generator"
    takes_source_gamma = True

    def __init__(self, config, dataset_names, modalities, device):
        super().__init__(config, dataset_names, modalities, device)
        model_cfg = dict(config["model"])
        disc_cfg = model_cfg.pop("discriminator", {})
        self.lambdas = lambdas_config(model_cfg.pop("lambdas", {}))  # a term not named: generator_loss's default
        self.lesion_weight = lesion_weight_config(model_cfg.pop("lesion_weight", 0.0))
        self.dataset_lesion_weight = dataset_lesion_weight_config(model_cfg.pop("dataset_lesion_weight", None),
                                                                  dataset_names)
        self.target_weight = target_weight_config(model_cfg.pop("target_weight", None), modalities)
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
        if self.target_weight is not None:
            synthesis_w = synthesis_w * self.target_weight.to(synthesis_w.device)
        inputs, context = x, batch.get("context")
        if self.source_gamma is not None:  # the sources' contrast changed; targets and references as stored
            gammas = draw_gammas(self.source_gamma, tuple(x.shape[:2]), int(self.train_cfg.get("seed", 0)), step,
                                 accelerator.process_index)
            inputs = to_network(raise_to(batch["images"], gammas))
            context = None if context is None else raise_to(context, gammas)
        inputs = inputs * sources[:, :, None, None]
        context = None if context is None else to_network(context)
        brain = batch["brain_mask"].to(x.device)  # the losses and the output's background take it
        pixel_weight = dataset_lesion_pixel_weight(batch["seg"], torch.as_tensor(batch["dataset_id"]), self.lesion_weight,
                                                   self.dataset_lesion_weight)  # by each image's own dataset, not dropped
        with accelerator.accumulate(generator, discriminators):
            fake = generator(inputs, sources, self._dataset_ids(batch), context=context)
            if accelerator_free(generator).config.inside_brain:
                # background outside the brain, as a pipeline returns it: the losses and the
                # discriminators judge the brain alone (the cache's images are 0 outside it). Scored
                # on the whole slice, the generator learns to draw the brain's outline from the
                # sources, and where they show the outermost CSF as dark as the background (FLAIR,
                # T1) it draws that rim dark in every target, ADC and T2 included, where it is bright.
                fake = inside_brain(fake, brain)
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
                                     **self.lambdas, pixel_weight=pixel_weight, brain=brain)
            accelerator.backward(g_terms["loss"])
            self._clip(accelerator, generator)
            self.optimizers["generator"].step()
            self.optimizers["generator"].zero_grad(set_to_none=True)
            self.optimizers["discriminators"].zero_grad(set_to_none=True)
        return logs | {k: v.item() for k, v in g_terms.items()}

    @torch.no_grad()
    def predict(self, images, sources, targets, dataset_id, generator=None, context=None, brain=None):
        x = to_network(images) * sources[:, :, None, None]
        context = None if context is None else to_network(context)
        out = self.models["generator"](x, sources, dataset_id, context=context)
        if brain is not None:  # as a pipeline returns it
            out = inside_brain(out, brain)
        return from_network(out)

    def export(self, models, out):
        MMGANPipeline(generator=models["generator"], preprocessor=self.preprocessor).save_pretrained(out)


STAGES = {"vae": VAEStage, "ldm": LDMStage, "gan": GANStage}
