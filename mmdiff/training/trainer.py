"""One training loop for every stage, on accelerate: one CPU, one GPU, many GPUs or many machines.

Per optimizer step: the stage's step on an MCBS batch, the LR schedule (constant, then linear decay
to zero: the paper's 2e-4 for 50 epochs, decayed over the last 150 of 200), the EMA, a log line,
and on their periods a checkpoint (atomic, safetensors) and a validation (PSNR/SSIM inside the brain
per target sequence, and an image grid). ``resume="latest"`` continues exactly where a checkpoint
left off: weights, optimizers, LR schedules, EMA, RNG, and the position in the epoch.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, set_seed
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data.cache import cache_preprocessor
from ..data.cache import describe as describe_cache
from ..evaluation.metrics import psnr, ssim
from ..evaluation.protocol import lesion_contrast
from ..io import write_json, write_text
from ..modalities import mask_key
from ..viz import montage
from .checkpoint import (CheckpointError, clean_temporaries, init_weights, load_checkpoint, resume_candidates, rng_state,
                         save_checkpoint, set_rng_state)
from .config import ConfigError, load_config
from .data import REPO_ROOT, ensure_cache, training_dataset, training_loader, validation_condition, validation_samples
from .stages import STAGES, Stage

logger = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on Ctrl-C or SIGTERM after saving a checkpoint of the step it had reached."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"interrupted at step {step}: checkpoint saved in {checkpoint}; continue with --resume latest")
        self.step, self.checkpoint = step, checkpoint


class StopRequests:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's kill, a session that ends) ask the loop to stop at the
    next step boundary, where it saves a checkpoint, instead of killing it mid-step and losing up to a
    checkpoint period of work. A second Ctrl-C stops at once (Python's KeyboardInterrupt).

    Written by hand: accelerate has no graceful-stop hook. Handlers are installed only in the main
    thread (Python's rule) and restored on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("%s received: stopping after this step with a checkpoint (Ctrl-C again: stop now)",
                       signal.Signals(signum).name)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def lr_factor(total_steps: int, decay_start: float, warmup_steps: int = 0):
    """LR multiplier per step: linear warm-up, constant, then linear decay to zero from ``decay_start``
    (a fraction of ``total_steps``)."""
    decay_from = int(total_steps * decay_start)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if step < decay_from:
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - decay_from))

    return factor


def _flat(config: dict, prefix: str = "") -> dict:
    """Config as flat scalars, for the tracker's hyper-parameter table."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= _flat(value, name + ".")
        else:
            out[name] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return out


def _trained_first(config: dict, output_dir: Path, section: dict, name: str, component: str) -> Path:
    """``section["path"]``, or (with ``path: null``) the ``component`` of a run of ``section["config"]``
    trained first inside this run's folder, on this run's data (resumed if it was interrupted)."""
    if section.get("path"):
        path = Path(section["path"]).expanduser()
        return path if path.is_absolute() or path.exists() else REPO_ROOT / path  # relative: to the repository
    sub_dir = output_dir / f"{name}-stage"
    final = sub_dir / "final" / component
    if not (final / "config.json").exists():
        sub_config = load_config(section["config"])
        sub_config["data"] = config["data"]
        train(sub_config, sub_dir, max_steps=section.get("max_steps"), resume="latest")
    return final


def _ldm_components(config: dict, output_dir: Path) -> dict:
    """The LDM stage's frozen parts: its predictor (``model.predictor``: a pipeline or generator folder,
    or a GAN config trained first) and, for ``model.latent.type: vae``, its VAE (likewise)."""
    model = config["model"]
    predictor = model.get("predictor") or {}
    if not predictor.get("path") and not predictor.get("config"):
        raise ConfigError("model.predictor needs a path (pipeline or generator folder) or a config to train first")
    parts = {"predictor_path": _trained_first(config, output_dir, predictor, "predictor", "generator")}
    latent = model.get("latent") or {}
    if latent.get("type") == "vae":
        parts["vae_path"] = _trained_first(config, output_dir, latent, "vae", "vae")
    return parts


def _predictor_context(path: str | Path) -> int:
    """``context_slices`` of a predictor (a pipeline folder's ``generator/`` or a generator folder)."""
    path = Path(path)
    config = path / "generator" / "config.json" if (path / "generator").is_dir() else path / "config.json"
    return int(json.loads(config.read_text()).get("context_slices", 0) or 0)


def train(config: dict, output_dir: str | Path, max_steps: int | None = None, resume: str | None = None,
          max_minutes: float | None = None) -> Path:
    """Train the stage a config names into ``output_dir``; returns the exported ``output_dir/final``.

    ``max_minutes`` (default ``train.max_minutes``) also ends training, at the first optimizer step
    after that much wall time in this process (for comparisons at equal wall time); the LR schedule
    still follows the step count.
    """
    output_dir = Path(output_dir)
    train_cfg = config["train"]
    if max_minutes is None:
        max_minutes = train_cfg.get("max_minutes")
    if max_minutes is not None and float(max_minutes) <= 0:
        raise ConfigError(f"max_minutes must be positive (or null for no time limit), got {max_minutes}")
    accelerator = Accelerator(
        gradient_accumulation_steps=int(train_cfg.get("gradient_accumulation_steps", 1)),
        mixed_precision=train_cfg.get("mixed_precision", "no"),
        log_with=None if config.get("tracker", "tensorboard") in (None, "none") else config.get("tracker", "tensorboard"),
        project_dir=str(output_dir),
        # streams of absent modalities, and discriminators of other targets, are unused in a step
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    seed = int(train_cfg.get("seed", 0))
    set_seed(seed, device_specific=True)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_text(output_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    cache = ensure_cache(config["data"], accelerator.is_main_process)
    accelerator.wait_for_everyone()
    parts = _ldm_components(config, output_dir) if config["stage"] == "ldm" else {}
    # a 2.5D model's neighbours: the GAN's own setting, or the LDM predictor's
    context_slices = (_predictor_context(parts["predictor_path"]) if parts
                      else int(config.get("model", {}).get("context_slices", 0) or 0))
    dataset = training_dataset(config["data"], cache, seed, context_slices)
    loader, sampler = training_loader(dataset, int(train_cfg["batch_size"]), seed,
                                      int(config["data"].get("num_workers", 0)),
                                      config["data"].get("lesion_oversample", 1),
                                      config["data"].get("dataset_oversample"))
    val_cfg = config.get("validation", {})
    val_samples = validation_samples(config["data"], cache, int(val_cfg.get("slices_per_case", 2)),
                                     int(val_cfg.get("cases_per_dataset", 1)), context_slices)

    stage_cls = STAGES[config["stage"]]
    extra = parts | {"validation": val_samples} if config["stage"] == "ldm" else {}
    stage: Stage = stage_cls(config, dataset.dataset_names, dataset.modalities, accelerator.device, **extra)
    stage.preprocessor = cache_preprocessor(cache)  # exported with the model: it is fed as it was trained
    names = list(stage.models)
    for name in names:
        stage.models[name].to(accelerator.device).train()
    main_model = stage.models[stage.main]
    ema = EMAModel(main_model.parameters(), decay=float(train_cfg["ema_decay"])) if train_cfg.get("ema_decay") else None

    steps_per_epoch = max(1, math.ceil(len(sampler) / accelerator.num_processes)
                          // accelerator.gradient_accumulation_steps)
    if max_steps is None:
        max_steps = train_cfg.get("max_steps")
    total = int(max_steps) if max_steps is not None else int(train_cfg["epochs"]) * steps_per_epoch
    factor = lr_factor(total, float(train_cfg.get("decay_start", 0.25)), int(train_cfg.get("warmup_steps", 0)))
    # schedulers stay unprepared: accelerate would step them once per process
    schedulers = {n: torch.optim.lr_scheduler.LambdaLR(o, factor) for n, o in stage.optimizers.items()}

    prepared = accelerator.prepare(*[stage.models[n] for n in names], *[stage.optimizers[n] for n in names], loader)
    stage.models = dict(zip(names, prepared[: len(names)]))
    stage.optimizers = dict(zip(names, prepared[len(names): 2 * len(names)]))
    loader = prepared[-1]
    if ema is not None:
        ema.to(accelerator.device)

    step, batches_done = 0, 0
    if accelerator.is_main_process:
        for stale in clean_temporaries(output_dir):
            logger.info("removed %s, a checkpoint a killed run left half-written", stale.name)
    candidates = resume_candidates(output_dir, resume)
    for i, checkpoint in enumerate(candidates):
        try:
            state = load_checkpoint(checkpoint, {n: accelerator.unwrap_model(stage.models[n]) for n in names})
            _restore(state, names, stage, schedulers, ema)
        except CheckpointError as exc:
            if i + 1 == len(candidates):
                raise CheckpointError(f"cannot resume from {checkpoint}: {exc}. "
                                      + ("Resume from another checkpoint with --resume PATH, or start again "
                                         "without --resume" if resume != "latest" else
                                         "No earlier complete checkpoint is left: start again without --resume")
                                      ) from None
            logger.warning("cannot resume from %s (%s): falling back to %s, the previous complete checkpoint",
                           checkpoint.name, exc, candidates[i + 1].name)
            continue
        step, batches_done = int(state["step"]), int(state["batches_done"])
        set_rng_state(state["rng"])
        logger.info("resumed from %s at step %d", checkpoint, step)
        break
    init_from = train_cfg.get("init_from")
    if init_from and step == 0:  # fine-tuning: weights only, a fresh schedule; a resumed run keeps its own
        report = init_weights(Path(init_from).expanduser(),
                              {n: accelerator.unwrap_model(stage.models[n]) for n in names})
        for name, parts_of in report.items():
            logger.info("%s from %s: %d tensors loaded, fresh: %s, unused: %s", name, init_from,
                        len(parts_of["loaded"]), ", ".join(parts_of["fresh"]) or "none",
                        ", ".join(parts_of["unused"]) or "none")
        if ema is not None:  # the average starts from the loaded weights, not the random ones
            ema = EMAModel(accelerator.unwrap_model(stage.models[stage.main]).parameters(),
                           decay=float(train_cfg["ema_decay"]))
            ema.to(accelerator.device)
    if accelerator.is_main_process:  # a run that starts over (step 0) forgets every record of the one before
        _forget_metrics_after(output_dir / "metrics.jsonl", step if step else -1, finished=step >= total)

    if accelerator.is_main_process and accelerator.log_with:
        accelerator.init_trackers("mmdiff", config=_flat(config))

    def save():
        weights = {n: accelerator.get_state_dict(stage.models[n]) for n in names}  # collective under FSDP
        if not accelerator.is_main_process:
            return
        state = {"optimizers": {n: stage.optimizers[n].state_dict() for n in names},
                 "schedulers": {n: schedulers[n].state_dict() for n in names},
                 "batches_done": batches_done, "rng": rng_state(), "stage": stage.state_dict()}
        if ema is not None:
            state["ema"] = ema.state_dict()
        keep = config.get("checkpoint", {}).get("keep")
        save_checkpoint(output_dir, step, weights, state, keep=int(keep) if keep else None)

    ckpt_every = int(config.get("checkpoint", {}).get("every", 0) or 0)
    val_every = int(val_cfg.get("every", 0) or 0)
    log_every = int(train_cfg.get("log_every", 10))
    bar = tqdm(total=total, initial=step, desc=f"train {config['stage']}", unit="step",
               disable=not accelerator.is_local_main_process)
    batches_per_epoch = len(loader)
    if val_every and step == 0 and total > 0:
        validate(stage, val_samples, accelerator, step, output_dir, ema)  # the baseline the curve starts from
    started = time.monotonic()
    deadline = started + 60 * float(max_minutes) if max_minutes else None
    interrupted = False
    with StopRequests() as stop:
        while step < total and not interrupted:
            epoch, in_epoch = divmod(batches_done, batches_per_epoch)
            sampler.set_epoch(epoch)
            dataset.set_epoch(epoch)
            for batch in accelerator.skip_first_batches(loader, in_epoch) if in_epoch else loader:
                logs = stage.training_step(batch, accelerator, step)
                batches_done += 1
                if not accelerator.sync_gradients:
                    continue
                for scheduler in schedulers.values():
                    scheduler.step()
                if ema is not None:
                    ema.step(accelerator.unwrap_model(stage.models[stage.main]).parameters())
                step += 1
                bar.update()
                if step % log_every == 0 or step == total:
                    record = {f"train/{k}": v for k, v in logs.items()} | {"lr": schedulers[stage.main].get_last_lr()[0]}
                    bar.set_postfix({k: f"{logs[k]:.4f}" for k in ("loss", "error_nll") if k in logs})
                    _log(accelerator, output_dir, step, record)
                if ckpt_every and step % ckpt_every == 0 and step < total:
                    save()
                if val_every and step % val_every == 0 and step < total:
                    validate(stage, val_samples, accelerator, step, output_dir, ema)
                late, interrupted = _any_rank(accelerator, deadline is not None and time.monotonic() > deadline,
                                              stop.requested)
                if late:
                    logger.info("stopping at step %d: the %s-minute budget is spent", step, max_minutes)
                    total = step
                if interrupted:
                    break
                if step >= total:
                    break
    if interrupted:  # a checkpoint of the step reached; no export (the run is not finished)
        bar.close()
        save()
        accelerator.wait_for_everyone()
        raise TrainingInterrupted(step, output_dir / f"checkpoint-{step}")
    bar.close()
    train_minutes = round((time.monotonic() - started) / 60, 2)  # the loop only: no export, no final validation
    stage.finish(loader, accelerator)
    save()
    metrics = validate(stage, val_samples, accelerator, step, output_dir, ema)
    checksums = rank_checksums(accelerator, stage.models[stage.main])
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the ranks' weights differ after training (checksums {checksums}): DDP is out of sync")
    final = output_dir / "final"
    if accelerator.is_main_process:
        unwrapped = {n: accelerator.unwrap_model(stage.models[n]) for n in names}
        if ema is not None:
            ema.copy_to(unwrapped[stage.main].parameters())
        stage.export(unwrapped, final)
        write_json(final / "training_info.json", {
            "stage": config["stage"], "steps": step, "datasets": dataset.dataset_names,
            "modalities": dataset.modalities, "data": describe_cache(cache, config["data"].get("datasets")),
            "processes": accelerator.num_processes, "device": accelerator.device.type,
            "rank_checksums": checksums, "validation": metrics, "config": portable_config(config),
            "train_minutes": train_minutes})
    accelerator.wait_for_everyone()
    for tracker in accelerator.trackers:  # not end_training(): it would end the process group a sub-run shares
        tracker.finish()
    return final


def portable_config(config: dict) -> dict:
    """The config for a published record: an absolute ``data.cache`` (this machine's path) is left out;
    the record's ``data`` section identifies the data instead."""
    cache = str(config.get("data", {}).get("cache", ""))
    if not Path(cache).is_absolute():
        return config
    return {**config, "data": {k: v for k, v in config["data"].items() if k != "cache"}}


def _restore(state: dict, names, stage: Stage, schedulers: dict, ema) -> None:
    """Optimizers, LR schedules, EMA and stage state from a checkpoint's ``state.pt``."""
    try:
        for n in names:
            stage.optimizers[n].load_state_dict(state["optimizers"][n])
            schedulers[n].load_state_dict(state["schedulers"][n])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        stage.load_state_dict(state["stage"])
        missing = [key for key in ("batches_done", "rng") if key not in state]
        if missing:
            raise KeyError(", ".join(missing))
    except (KeyError, ValueError, RuntimeError, TypeError) as exc:
        raise CheckpointError("its state.pt does not hold this run's training state "
                              f"({type(exc).__name__}: {exc})") from None


def _forget_metrics_after(path: Path, step: int, finished: bool) -> None:
    """Drop the ``metrics.jsonl`` records a resumed run will write again: those after ``step`` (all
    for ``step=-1``, and when the run resumes at its last step, that step's final validation); a line
    a killed run left half-written goes too."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) > step or (finished and record.get("step") == step
                                            and any(k.startswith("val/") for k in record)):
            continue
        kept.append(line)
    write_text(path, "".join(f"{line}\n" for line in kept))


def _any_rank(accelerator, *flags: bool) -> list[bool]:
    """Each flag, true if it is true on any process (so every rank stops at the same step): one
    collective per step for all of them; a single process only reads its own (no device sync on the
    training hot path)."""
    if accelerator.num_processes == 1:
        return [bool(f) for f in flags]
    values = torch.tensor([float(f) for f in flags], device=accelerator.device)
    return [bool(v > 0) for v in accelerator.reduce(values, reduction="sum").tolist()]


def rank_checksums(accelerator, model) -> list[float]:
    """A weight checksum per process (gathered): equal on every rank when DDP kept them in sync."""
    params = accelerator.unwrap_model(model).parameters()
    local = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1).to(accelerator.device)
    return [float(v) for v in accelerator.gather(local).cpu()]


def _log(accelerator, output_dir: Path, step: int, record: dict) -> None:
    accelerator.log(record, step=step)
    if accelerator.is_main_process:
        with open(output_dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"step": step, **record}) + "\n")


@torch.no_grad()
def validate(stage: Stage, samples: list[dict], accelerator, step: int, output_dir: Path, ema) -> dict:
    """PSNR/SSIM inside the brain per target sequence, and the lesion-contrast error where a slice has
    a lesion, on fixed slices, with the EMA weights.

    Every process runs it (a DDP forward may synchronise); the main process logs and writes the grid.
    """
    if not samples:
        return {}
    main_params = list(accelerator.unwrap_model(stage.models[stage.main]).parameters())
    if ema is not None:
        ema.store(main_params)
        ema.copy_to(main_params)
    for model in stage.models.values():
        model.eval()
    reconstruct = stage.main == "vae"
    scores = defaultdict(lambda: defaultdict(list))
    rows = []
    generator = torch.Generator(device="cpu").manual_seed(0)
    groups = defaultdict(list)
    for i, s in enumerate(samples):
        groups[(s["dataset_id"], mask_key(s["available"]))].append(i)
    device = accelerator.device
    for indices in groups.values():
        images = torch.stack([samples[i]["images"] for i in indices]).to(device)
        conditions = [validation_condition(samples[i]["available"], i, reconstruct) for i in indices]
        sources = torch.stack([c[0] for c in conditions]).to(device)
        targets = torch.stack([c[1] for c in conditions]).to(device)
        dataset_id = torch.tensor([samples[i]["dataset_id"] for i in indices], device=device)
        extra = {"context": torch.stack([samples[i]["context"] for i in indices]).to(device)} \
            if "context" in samples[indices[0]] else {}
        extra["brain"] = torch.stack([samples[i]["brain_mask"] for i in indices]).to(device)
        pred = stage.predict(images, sources, targets, dataset_id, generator=generator, **extra).float()
        for row, i in enumerate(indices):
            brain = samples[i]["brain_mask"][None].to(device)
            lesion = (samples[i]["seg"] > 0).numpy() & samples[i]["brain_mask"].numpy()
            for m in targets[row].nonzero().flatten().tolist():
                name = stage.modalities[m]
                scores[name]["psnr"].append(psnr(pred[row, m][None], images[row, m][None], brain).item())
                scores[name]["ssim"].append(ssim(pred[row, m][None], images[row, m][None], brain).item())
                if lesion.sum() >= 20:  # lesion contrast, synthetic against real (1 is faithful)
                    healthy = samples[i]["brain_mask"].numpy()
                    real = lesion_contrast(images[row, m].cpu().numpy(), healthy, lesion)
                    synthetic = lesion_contrast(pred[row, m].cpu().numpy(), healthy, lesion)
                    if np.isfinite(real) and np.isfinite(synthetic):
                        scores[name]["contrast_error"].append(abs(synthetic / real - 1))
            if len(rows) < 8:
                rows.append(_grid_row(stage.modalities, images[row], pred[row], sources[row], targets[row],
                                      samples[i]["case_id"], samples[i]["slice"]))
    if ema is not None:
        ema.restore(main_params)
    for model in stage.models.values():
        model.train()
    metrics = {f"val/{k}_{name}": float(np.mean(v)) for name, d in scores.items() for k, v in d.items()}
    if metrics:
        metrics["val/psnr"] = float(np.mean([v for k, v in metrics.items() if k.startswith("val/psnr_")]))
        metrics["val/ssim"] = float(np.mean([v for k, v in metrics.items() if k.startswith("val/ssim_")]))
        errors = [v for k, v in metrics.items() if k.startswith("val/contrast_error_")]
        if errors:  # |synthetic / real lesion contrast - 1|, for choosing checkpoints by lesions too
            metrics["val/contrast_error"] = float(np.mean(errors))
    if accelerator.is_main_process:
        _log(accelerator, output_dir, step, metrics)
        montage(rows, output_dir / "validation" / f"step-{step:07d}.png", cell=128,
                title=f"validation at step {step}: sources | real | synthetic | |error| (brain PSNR {metrics.get('val/psnr', 0):.2f} dB)")
    return metrics


def _grid_row(modalities, images, pred, sources, targets, case_id, slice_index):
    """One validation grid row: up to three sources, then real, synthetic and error of the first target."""
    def show(a):
        return np.rot90(a.float().cpu().numpy())[:, ::-1]  # RAS slice -> radiological display

    m = targets.nonzero().flatten().tolist()[0]
    panels = [(f"in {modalities[s]}", show(images[s])) for s in sources.nonzero().flatten().tolist()[:3]]
    panels += [(f"real {modalities[m]}", show(images[m])), (f"synth {modalities[m]}", show(pred[m])),
               ("|error|", show((pred[m] - images[m]).abs()))]
    return (f"{case_id}:{slice_index}", panels)


__all__ = ["train", "lr_factor", "validate"]
