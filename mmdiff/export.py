"""Publishing: a training run -> a pipeline folder in Hugging Face layout with its model card
(``mmdiff export``), and that folder -> the Hub (``mmdiff push``).

The card is rendered from ``model_cards/pipeline.md`` with :class:`huggingface_hub.ModelCard`; its
metadata carries a ``model-index`` of held-out results when an ``mmdiff evaluate`` folder is given.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .io import atomic_dir

TEMPLATE = Path(__file__).resolve().parents[1] / "model_cards" / "pipeline.md"
DTYPES = {"float16": torch.float16, "float32": torch.float32}
SYNTHESIS_TASK = "image-to-image"


def cast_safetensors(folder: Path, dtype: torch.dtype) -> None:
    """Cast every floating-point tensor of the folder's safetensors files to ``dtype``, in place.

    diffusers loads such weights back into the models' float32 parameters, so fp16 files halve the
    download and cost only the rounding of the weights.
    """
    for file in folder.rglob("*.safetensors"):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(file).items()}
        save_file(tensors, file, metadata={"format": "pt"})


def _evaluation_rows(evaluation: Path | None) -> list[dict]:
    if evaluation is None:
        return []
    scores = Path(evaluation) / "scores.csv"
    if not scores.exists():
        raise FileNotFoundError(f"{scores} not found: pass the output folder of `mmdiff evaluate`")
    with open(scores, newline="") as f:
        return list(csv.DictReader(f))


def _results(rows: list[dict], method: str, evaluation: Path | None):
    """(EvalResults for the card's metadata, markdown for its results section)."""
    from huggingface_hub import EvalResult

    from .evaluation.report import aggregate, summary_markdown

    if not rows:
        return [], "Not evaluated yet: run `mmdiff evaluate` and export again with `--evaluation`."
    if not any(r["method"] == method for r in rows):
        raise ValueError(f"{evaluation} has no scores for {method!r} (it has {sorted({r['method'] for r in rows})})")
    results = []
    split = "+".join(sorted({row["split"] for row in rows}))
    for (dataset, task, name), stats in sorted(aggregate(rows).items()):
        if name != method:
            continue
        for column, metric_type, metric_name in (("psnr_brain", "psnr", "PSNR inside the brain (dB)"),
                                                 ("ssim_brain", "ssim", "SSIM inside the brain")):
            mean, _, cases = stats[column]
            results.append(EvalResult(
                task_type=SYNTHESIS_TASK, task_name=f"MRI synthesis {task}", dataset_type=dataset,
                dataset_name=dataset, dataset_config=task, dataset_split=split, metric_type=metric_type, metric_name=metric_name,
                metric_value=round(mean, 3 if metric_type == "ssim" else 2), metric_config=f"{cases} cases"))
    text = ("Measured with `mmdiff evaluate` on held-out cases that no model saw in training; the same table "
            "has the baselines (the nearest given sequence copied; a voxelwise quadratic regression fitted "
            "per dataset on its training cases).\n\n" + summary_markdown(rows))
    return results, text


def _downstream(downstream: Path | None, method: str) -> str:
    """The card's downstream section from an ``mmdiff downstream`` folder scored with ``method``."""
    if downstream is None:
        return ""
    record, table = Path(downstream) / "dice.json", Path(downstream) / "dice.md"
    if not (record.is_file() and table.is_file()):
        raise FileNotFoundError(f"{downstream} holds no dice.json/dice.md: pass the output folder of `mmdiff downstream`")
    scored = json.loads(record.read_text())["method"]
    if scored != method:
        raise ValueError(f"{downstream} scored {scored!r}, not {method!r}")
    return ("\n\n### Downstream: tumour segmentation with a synthetic sequence\n\n"
            "Measured with `mmdiff downstream`: a segmentation network trained on the real sequences is "
            "run with one of them replaced by this model's synthesis, against a network trained "
            "without that sequence.\n\n" + table.read_text().strip())


def _parameters(pipe) -> str:
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in pipe.components.items()
              if isinstance(module, torch.nn.Module)}
    total = sum(counts.values())
    return f"{total / 1e6:.1f} M (" + ", ".join(f"{n} {c / 1e6:.1f} M" for n, c in counts.items()) + ")"


def render_card(pipe, info: dict, rows: list[dict], method: str, evaluation: Path | None, dtype: str,
                repo_id: str | None, cache_config: dict | None, training_note: str | None = None,
                downstream: Path | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    is_diffusion = hasattr(pipe, "scheduler")
    engine = "ldm" if is_diffusion else "gan"
    eval_results, results_text = _results(rows, method, evaluation)
    name = repo_id.split("/")[-1] if repo_id else f"mmdiff-{engine}"
    datasets = info.get("datasets", [])
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag=SYNTHESIS_TASK, license="apache-2.0", model_name=name,
        tags=["mri", "medical-imaging", "image-synthesis", "missing-modality", "mmdiff",
              "latent-diffusion" if is_diffusion else "gan"],
        datasets=["brats-2018-sample", "mmdiff-phantoms"], eval_results=eval_results or None)
    train_cfg = info["config"]["train"]
    steps = info["steps"]
    geometry = (cache_config or {}).get("geometry", {})
    model_description = (
        "Residual diffusion on a one-step predictor (as CorrDiff), in a lossless Haar wavelet latent: the "
        "predictor (the mmdiff GAN generator, a pipeline component) gives the mean `mu` of every missing "
        "sequence; a UNet conditioned on the source latents, `mu`, the availability mask, the timestep and "
        "a learned dataset embedding (feature modulation in every block, as the GAN) samples the residual "
        "`y - mu` in the two-level Haar latent, predicting the clean residual (a zero-initialised output: "
        "untrained, it returns `mu` exactly). The image is `mu` plus the UNet's posterior-mean residual; "
        "with `num_samples=K > 1` the pipeline also returns the per-voxel standard deviation of K sampled "
        "residuals, scaled so that `image +- uncertainty` covers the stated fraction of brain voxels on "
        "validation slices (`interval_scale`, `coverage` in `model_index.json`), and `return_samples=True` "
        "gives the samples themselves. Sampled with the scheduler saved here (any diffusers scheduler "
        "can be swapped in)."
        if is_diffusion else
        "A one-step multi-modal generator (UNet with dataset-embedding feature modulation) trained "
        "adversarially against per-modality patch discriminators, with selective supervision of the "
        "missing sequences and reconstruction of the given ones. Deterministic: one forward pass per slice.")
    return ModelCard.from_template(
        card_data, template_path=str(TEMPLATE),
        title=f"{name}: {'latent diffusion' if is_diffusion else 'GAN'} synthesis of missing MRI sequences",
        summary=("Given any subset of T1, T2, T1C, FLAIR, DWI and ADC of a brain MRI exam, this "
                 f"mmdiff pipeline (`{type(pipe).__name__}`) synthesises "
                 "the others, slice by slice, on the input's own grid."),
        engine=engine, pipeline_ref=repo_id or f"pipelines/{name}", pipeline_class=type(pipe).__name__,
        call_extra=", num_inference_steps=10, num_samples=4" if is_diffusion else "",
        model_description=model_description,
        modalities=", ".join(pipe.modalities), datasets=", ".join(datasets), parameters=_parameters(pipe),
        weights=f"safetensors, {dtype} (loaded into float32 by diffusers)",
        training=(f"{steps} steps, batch {train_cfg['batch_size']} (modality-consistent batches), "
                  f"AdamW lr {train_cfg['learning_rate']}, EMA {train_cfg.get('ema_decay')}, "
                  f"{train_cfg.get('condition_mode', 'random')} synthesis conditions, "
                  f"dataset dropout {train_cfg.get('dataset_dropout')}, "
                  f"{info.get('processes', 1)} process(es); the full config is in `training_info.json`"
                  + (f". {training_note}" if training_note else "")),
        training_data=(
            "Training splits of a prepared mmdiff cache (case-level splits; held-out cases never seen):\n\n"
            "- four simulated phantom cohorts (`mmdiff phantom`: glioma with all six sequences; an "
            "immune-disease cohort with random subsets of T1/T2/FLAIR/ADC at 3 mm; a BraTS-2021-like "
            "cohort; a stroke cohort with DWI/ADC and a tilted FLAIR), built from the MNI ICBM152 atlas "
            "with per-site protocols, bias fields and Rician noise;\n"
            "- the real BraTS 2018 sample (T1, T2, T1C, FLAIR; 12 cases, 10 for training).\n\n"
            f"Datasets in the embedding: {', '.join(datasets)}."),
        preprocessing=(
            f"- resampled to {geometry.get('spacing', [1.0, 1.0, 1.0])} mm and a "
            f"{geometry.get('size', 192)} x {geometry.get('size', 192)} axial plane centred on the brain "
            "(training); at inference any in-plane size runs (fully convolutional, zero-padded to a multiple "
            "of the downsampling);\n"
            "- each sequence clipped at the 99.5th percentile of its brain voxels and scaled to [0, 1], "
            "background 0;\n"
            "- outputs come back in that normalised scale, zero outside the brain, on the input grid."),
        results=results_text + _downstream(downstream, method),
        limits_extra=" (the LDM more than the GAN)" if is_diffusion else "",
    ).content


def export(run_dir: str | os.PathLike, out: str | os.PathLike, evaluation: str | os.PathLike | None = None,
           method: str | None = None, dtype: str = "float16", repo_id: str | None = None,
           training_note: str | None = None, downstream: str | os.PathLike | None = None,
           overwrite: bool = False) -> Path:
    """``run_dir/final`` (a trained pipeline) -> ``out``: weights in ``dtype``, ``training_info.json``
    and a ``README.md`` model card; ``evaluation`` (an ``mmdiff evaluate`` folder) fills its results,
    taking the rows of ``method`` (default: the folder name of ``out``); ``training_note`` adds what the
    run's own record cannot tell (e.g. that it resumed another run on other data); ``downstream`` (an
    ``mmdiff downstream`` folder scored with this method) adds its segmentation Dice to the card."""
    from .synthesize import load_pipeline

    run_dir, out = Path(run_dir), Path(out)
    final = run_dir / "final"
    if not (final / "model_index.json").exists():
        raise FileNotFoundError(f"{final} holds no trained pipeline: train to the end (or point at a run folder)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if out.resolve() in (run_dir.resolve(), final.resolve()):
        raise ValueError("the export folder must differ from the run folder")
    index = json.loads((final / "model_index.json").read_text())
    pipe = load_pipeline(final, "gan" if index["_class_name"] == "MMGANPipeline" else "ldm")
    info = json.loads((final / "training_info.json").read_text())
    cache_json = Path(info.get("cache", "")) / "cache.json"
    cache_config = json.loads(cache_json.read_text())["config"] if cache_json.is_file() else None
    rows = _evaluation_rows(Path(evaluation) if evaluation else None)
    card = render_card(pipe, info, rows, method or out.name, Path(evaluation) if evaluation else None, dtype,
                       repo_id, cache_config, training_note, Path(downstream) if downstream else None)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        cast_safetensors(tmp, DTYPES[dtype])
        (tmp / "training_info.json").write_text(json.dumps({**info, "exported_dtype": dtype}, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
    return out


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str | None = None, revision: str | None = None) -> str:
    """Upload a pipeline folder to the Hub (creating the repo if needed); returns the commit URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no model_index.json): run `mmdiff export` first")
    if not (folder / "README.md").exists():
        raise FileNotFoundError(f"{folder} has no README.md model card: run `mmdiff export` to write one")
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                   commit_message=commit_message or f"Upload {folder.name} with mmdiff push",
                                   allow_patterns=["*.json", "*.safetensors", "*.md"])
    except OfflineModeIsEnabled as exc:
        raise ValueError("HF_HUB_OFFLINE is set: unset it to push") from exc
    except HfHubHTTPError as exc:  # no or wrong token, no write access, hub unreachable
        raise ValueError(f"the Hub refused the upload to {repo_id} ({exc}); log in with `hf auth login` "
                         "or set HF_TOKEN to a token with write access") from exc
    return commit.commit_url
