"""Publishing: a training run -> a pipeline folder in Hugging Face layout with its model card
(``mmdiff export``), and that folder -> the Hub (``mmdiff push``).

The card is rendered from ``model_cards/pipeline.md`` with :class:`huggingface_hub.ModelCard`; its
metadata carries a ``model-index`` of held-out results when an ``mmdiff evaluate`` folder is given.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data.cache import CACHE_JSON, INDEX_JSON
from .data.cache import describe as describe_cache
from .io import atomic_dir
from .resources import model_card_template
from .validation import CONFIG_ONLY_FILES

DTYPES = {"float16": torch.float16, "float32": torch.float32}
SYNTHESIS_TASK = "image-to-image"


#: the GAN card's note under "Use" (one sentence, the numbers in BENCHMARKS.md, session 17)
FLIP_NOTE = ("\nFor the best image the GAN can give, `--flip-average` (`flip_average=True`) also runs every slice "
             "mirrored left-right and averages the two: a better image for twice the network time (mmdiff's "
             "published GAN: +0.14 dB PSNR and a higher correlation with the real scans on its held-out cases, session 18).\n")


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


def training_data(info: dict) -> dict | None:
    """What identifies a run's training data (``training_info.json``'s ``data``: dataset names, case
    counts, the cache's fingerprint and preparation); for an older record that names its cache
    folder, read from that cache if it is still there; else ``None``."""
    if info.get("data"):
        return info["data"]
    cache = info.get("cache")
    if cache and (Path(cache) / CACHE_JSON).is_file() and (Path(cache) / INDEX_JSON).is_file():
        return describe_cache(cache, info.get("config", {}).get("data", {}).get("datasets"))
    return None


def _phantom_cohorts(info: dict, data: dict | None) -> list[str]:
    """The datasets of the run that are mmdiff phantom cohorts (the run's config built phantoms)."""
    from .data.phantom import COHORTS

    built = info.get("config", {}).get("data", {}).get("build", {}) or {}
    names = (data or {}).get("datasets", {}) or {name: None for name in info.get("datasets", [])}
    return [name for name in names if built.get("phantom") and name in COHORTS]


def _training_data_text(info: dict, data: dict | None) -> str:
    if data is None:
        return ("Not recorded: this run's `training_info.json` does not describe its data "
                f"(datasets in the embedding: {', '.join(info.get('datasets', [])) or 'none'}).")
    phantoms = _phantom_cohorts(info, data)
    lines = [f"Case-level splits of a prepared mmdiff cache (fingerprint `{data['fingerprint']}`); "
             "held-out cases were never seen in training:\n"]
    for name, d in data["datasets"].items():
        sequences = ", ".join(f"{m} {n}" for m, n in d["modalities"].items())
        kind = " (mmdiff phantom cohort)" if name in phantoms else ""
        lines.append(f"- `{name}`{kind}: {d['cases']} cases ({d['splits']['train']} train, {d['splits']['val']} "
                     f"validation, {d['splits']['test']} test), {d['slices']} axial slices; cases per sequence: "
                     f"{sequences}" + (f"; {d['labelled']} with lesion labels" if d.get("labelled") else ""))
    if phantoms:
        lines.append("\nPhantom cohorts are simulated by `mmdiff phantom` from the MNI ICBM152 atlas with "
                     "per-site protocols, bias fields and Rician noise; they are not patients.")
    return "\n".join(lines)


def _scale_text(info: dict, data: dict | None, parameters: str) -> str:
    minutes = info.get("train_minutes")
    where = f"{info.get('processes', 1)} {info.get('device', 'unrecorded-device')} process(es)"
    text = (f"Trained for {info['steps']} steps" + (f" ({minutes} minutes)" if minutes is not None else "")
            + f" on {where}; {parameters} parameters.")
    if data is not None:
        train = sum(d["splits"]["train"] for d in data["datasets"].values())
        text += (f" {train} training cases from {len(data['datasets'])} dataset(s); sequences seen per dataset: "
                 + "; ".join(f"{name}: {', '.join(d['modalities'])}" for name, d in data["datasets"].items())
                 + ". Check the held-out results above before relying on a sequence or a dataset.")
    return text


def _preprocessing(data: dict | None, preprocessor) -> tuple[str, str]:
    """(the card's preprocessing list, the in-plane spacing it expects) from the cache's preparation and
    the pipeline's intensity rule (None: the rule of pipelines saved before it was stored)."""
    from .data.preprocessing import MRIPreprocessor

    intensity = (preprocessor or MRIPreprocessor.legacy()).describe()
    if data is None:
        return ("- as prepared by `mmdiff prepare` (the run did not record its preparation settings);\n"
                f"- intensities: {intensity};\n"
                "- outputs come back in the normalised [0, 1] scale, zero outside the brain, on the input grid.",
                "the training data's")
    preparation = data["preparation"]
    geometry = preparation.get("geometry", {})
    spacing, size = geometry.get("spacing", preparation.get("spacing")), geometry.get("size", preparation.get("size"))
    spacing_text = " x ".join(f"{s:g}" for s in spacing) if isinstance(spacing, (list, tuple)) else f"{spacing:g}"
    text = (f"- resampled to {spacing_text} mm and a {size} x {size} axial plane centred on the brain "
            "(training); at inference the network runs on a window around the brain, any in-plane size "
            "(fully convolutional);\n"
            f"- intensities: {intensity};\n"
            "- outputs come back in that normalised scale, zero outside the brain, on the input grid.")
    in_plane = spacing[0] if isinstance(spacing, (list, tuple)) else spacing
    return text, f"{in_plane:g}"


def _citations(info: dict, data: dict | None) -> str:
    names = list((data or {}).get("datasets", {})) or info.get("datasets", [])
    phantoms = _phantom_cohorts(info, data)
    text = ""
    if phantoms:
        text += (" The phantom anatomy is derived from the MNI ICBM152 2009a atlas (see "
                 "`mmdiff/data/anatomy/LICENSE`).")
    if any("brats" in name.lower() and name not in phantoms for name in names):
        text += " BraTS data: Menze et al. 2015, Bakas et al. 2017 and 2018."
    return text


def _slice_limits(pipe) -> str:
    """What the card says about consistency across axial slices: the predictor's context decides it."""
    generator = pipe.predictor if pipe.engine == "ldm" else pipe.generator
    k = int(getattr(generator.config, "context_slices", 0) or 0)
    if k:
        text = (f"2.5D: each axial slice is synthesised with its {k} neighbouring slice(s) on each side "
                "as input, so consecutive slices agree, but there is no 3D model")
    else:
        text = "2D axial slices: through-plane consistency is not enforced; expect slice-to-slice flicker"
    if pipe.engine == "ldm":
        text += ("; a diffusion sample's noise varies smoothly along z by default (`slice_noise=\"smooth\"`: "
                 "correlated over about one slice either side), so sampling adds neither flicker between "
                 "slices nor one texture repeated through the volume")
    return text + "."


def generator_layout(config) -> str:
    """A sentence on the generator's layout, from its own config (the card says what the weights are)."""
    parts = []
    if not config.get("modality_streams", True) and config.get("shared_decoder", False):
        parts.append("one U-Net with a channel per sequence (the lean layout)")
    if config.get("patch_size", 1) > 1:
        parts.append(f"run on {config['patch_size']} x {config['patch_size']} patches with a full-resolution output "
                     "layer" + (" low-passed against a patch mesh" if config.get("refine_blur") else ""))
    k = int(config.get("context_slices", 0))
    if k:
        parts.append(("the neighbouring slice" if k == 1 else f"the {k} neighbouring slices")
                     + " on each side of every source as input (2.5D)")
    if config.get("detail_transfer"):
        bands = int(config.get("detail_bands", 1))
        parts.append("each source's own fine detail (the image minus its [1 2 1] blur"
                     + (f", and {bands - 1} coarser à trous band{'s' if bands > 2 else ''}" if bands > 1 else "")
                     + (", and its low-pass below them: the whole source" if config.get("detail_base") else "")
                     + ") added back to each output, weighted per voxel by coefficients the decoder draws")
    if config.get("fine_channels"):
        parts.append(f"a {config['fine_channels']}-channel full-resolution head over the features and the sources "
                     "that can draw pixel-scale structure no source has (such as a thin lesion edge), "
                     "which the 2 x 2 patches blur")
    return (" Layout: " + "; ".join(parts) + ".") if parts else ""


def render_card(pipe, info: dict, rows: list[dict], method: str, evaluation: Path | None, dtype: str,
                repo_id: str | None, training_note: str | None = None, downstream: Path | None = None) -> str:
    """The model card: every fact about the training comes from the run's ``training_info.json``."""
    from huggingface_hub import ModelCard, ModelCardData

    from .pipelines.common import diffusion_settings

    engine = pipe.engine
    is_diffusion = engine == "ldm"
    eval_results, results_text = _results(rows, method, evaluation)
    name = repo_id.split("/")[-1] if repo_id else f"mmdiff-{engine}"
    datasets = info.get("datasets", [])
    data = training_data(info)
    parameters = _parameters(pipe)
    preprocessing, spacing = _preprocessing(data, getattr(pipe, "preprocessor", None))
    card_data = ModelCardData(
        library_name="diffusers", pipeline_tag=SYNTHESIS_TASK, license="apache-2.0", model_name=name,
        tags=["mri", "medical-imaging", "image-synthesis", "missing-modality", "mmdiff",
              "latent-diffusion" if is_diffusion else "gan"],
        datasets=list((data or {}).get("datasets", {})) or datasets or None, eval_results=eval_results or None)
    train_cfg = info["config"]["train"]
    steps = info["steps"]
    model_description = (
        "Residual diffusion on a one-step predictor (as CorrDiff), in a lossless Haar wavelet latent: the "
        "predictor (the mmdiff GAN generator, a pipeline component) gives the mean `mu` of every missing "
        "sequence; a UNet conditioned on the source latents, `mu`, the availability mask, the timestep and "
        "a learned dataset embedding (feature modulation in every block, as the GAN) samples the residual "
        "`y - mu` in the two-level Haar latent, predicting the clean residual (a zero-initialised output: "
        "untrained, it returns `mu` exactly). The image is `mu` plus the UNet's posterior-mean residual, "
        "weighted by a factor fitted on validation slices for the number of runs K (`residual_fit` in "
        "`model_index.json`: a residual that does not help there is shrunk toward the predictor's image; "
        "`mmdiff calibrate` refits it on other data); "
        + ("an error model (a small network trained beside the UNet, a pipeline component"
           + (", its features modulated by the dataset embedding as the UNet's"
              if getattr(getattr(pipe.error_model, "config", None), "use_pfm", False) else "")
           + ") states per "
           "voxel how far off `mu` is likely to be (the scale of a Laplace error, trained by its likelihood "
           "on the predictor's errors); the uncertainty combines it with the spread of the K sampled "
           "residuals (their variance pooled over a small window of pixels, `uncertainty_window`), "
           if getattr(pipe, "error_model", None) is not None else
           "with `num_samples=K > 1` the pipeline also returns the standard deviation of K sampled "
           "residuals (its variance pooled over a small window of pixels, `uncertainty_window`, so that two "
           "samples give a usable map), ") +
        "scaled so that `image +- uncertainty` covers the stated fraction of "
        "brain voxels on validation slices (`interval_scale`, `coverage` in `model_index.json`, and "
        "`interval_scales` per target sequence"
        + (" and per finer group with enough voxels, such as `t2 on brats from 1 source`"
           if set(pipe.config.get("interval_scales") or {}) - set(pipe.modalities) else "")
        + "; fitted for the pipeline's default K), and `return_samples=True` "
        "gives the samples themselves. Sampled with the scheduler saved here (any diffusers scheduler "
        "can be swapped in)."
        if is_diffusion else
        "A one-step multi-modal generator (UNet with dataset-embedding feature modulation) trained "
        "adversarially against per-modality patch discriminators, with selective supervision of the "
        "missing sequences and reconstruction of the given ones. Deterministic: one forward pass per slice."
        + generator_layout(pipe.generator.config))
    return ModelCard.from_template(
        card_data, template_path=str(model_card_template()),
        title=f"{name}: {'latent diffusion' if is_diffusion else 'GAN'} synthesis of missing MRI sequences",
        summary=("Given any subset of the sequences it knows of a brain MRI exam, this "
                 f"mmdiff pipeline (`{type(pipe).__name__}`) synthesises "
                 "the others, slice by slice, on the input's own grid."),
        engine=engine, pipeline_ref=repo_id or f"pipelines/{name}", pipeline_class=type(pipe).__name__,
        call_extra="".join(f", {k}={v}" for k, v in zip(("num_inference_steps", "num_samples"), diffusion_settings(pipe)))
        if is_diffusion else "",
        use_note="" if is_diffusion else FLIP_NOTE,
        model_description=model_description,
        modalities=", ".join(pipe.modalities), datasets=", ".join(datasets), parameters=parameters,
        weights=f"safetensors, {dtype} (loaded into float32 by diffusers)",
        training=(f"{steps} steps, batch {train_cfg['batch_size']} (modality-consistent batches), "
                  f"AdamW lr {train_cfg['learning_rate']}, EMA {train_cfg.get('ema_decay')}, "
                  f"{train_cfg.get('condition_mode', 'random')} synthesis conditions, "
                  f"dataset dropout {train_cfg.get('dataset_dropout')}"
                  + (f" (of {', '.join(train_cfg['dataset_dropout_from'])} only)" if train_cfg.get("dataset_dropout_from")
                     else "") + ", "
                  + (f"sources raised to random powers in {list(train_cfg['source_gamma'])} (another site's "
                     "tissue contrasts), " if train_cfg.get("source_gamma") else "") +
                  f"{info.get('processes', 1)} process(es); the full config is in `training_info.json`"
                  + (f". {training_note}" if training_note else "")),
        training_data=_training_data_text(info, data),
        preprocessing=preprocessing, spacing=spacing,
        results=results_text + _downstream(downstream, method),
        scale=_scale_text(info, data, parameters), data_citations=_citations(info, data),
        slice_limits=_slice_limits(pipe),
        dataset_option=f" --dataset {datasets[0]}" if datasets else "",
        dataset_argument=f' dataset="{datasets[0]}",' if datasets else "",
    ).content


def export(run_dir: str | os.PathLike, out: str | os.PathLike, evaluation: str | os.PathLike | None = None,
           method: str | None = None, dtype: str = "float16", repo_id: str | None = None,
           training_note: str | None = None, downstream: str | os.PathLike | None = None,
           overwrite: bool = False) -> Path:
    """``run_dir/final`` (a trained pipeline; or ``run_dir`` itself, a pipeline folder with its
    ``training_info.json``) -> ``out``: weights in ``dtype``, ``training_info.json``
    and a ``README.md`` model card; ``evaluation`` (an ``mmdiff evaluate`` folder) fills its results,
    taking the rows of ``method`` (default: the folder name of ``out``); ``training_note`` adds what the
    run's own record cannot tell (e.g. that it resumed another run on other data); ``downstream`` (an
    ``mmdiff downstream`` folder scored with this method) adds its segmentation Dice to the card."""
    from .pipelines import load_pipeline

    run_dir, out = Path(run_dir), Path(out)
    final = run_dir / "final"
    if not (final / "model_index.json").exists() and (run_dir / "training_info.json").exists():
        final = run_dir  # a pipeline folder with its run record (e.g. one `mmdiff calibrate` wrote)
    if not (final / "model_index.json").exists():
        raise FileNotFoundError(f"{final} holds no trained pipeline: train to the end (or point at a run folder)")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists (pass --overwrite to replace it)")
    if out.resolve() in (run_dir.resolve(), final.resolve()):
        raise ValueError("the export folder must differ from the run folder")
    pipe = load_pipeline(final)
    info = json.loads((final / "training_info.json").read_text())
    data = training_data(info)
    if data is not None:  # what identifies the data, never this machine's cache path
        info = {**{k: v for k, v in info.items() if k != "cache"}, "data": data}
    rows = _evaluation_rows(Path(evaluation) if evaluation else None)
    card = render_card(pipe, info, rows, method or out.name, Path(evaluation) if evaluation else None, dtype,
                       repo_id, training_note, Path(downstream) if downstream else None)
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        cast_safetensors(tmp, DTYPES[dtype])
        (tmp / "training_info.json").write_text(json.dumps({**info, "exported_dtype": dtype}, indent=2) + "\n")
        (tmp / "README.md").write_text(card)
        if (final / "calibration.json").is_file():  # what `mmdiff calibrate` fitted, and on what
            shutil.copyfile(final / "calibration.json", tmp / "calibration.json")
        name_configs(tmp, repo_id or out.name)
    return out


def name_configs(folder: Path, name: str) -> None:
    """Set ``_name_or_path`` in a pipeline folder's configs to ``name`` (``name/<component>`` for a
    component's): diffusers records the folder a model was loaded from there, which would otherwise
    publish this machine's paths. diffusers sets it again on every load, so nothing reads the old one."""
    for path in sorted(folder.rglob("*.json")):
        config = json.loads(path.read_text())
        if isinstance(config, dict) and "_name_or_path" in config:
            component = path.parent.relative_to(folder).as_posix()
            config["_name_or_path"] = name if component == "." else f"{name}/{component}"
            path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


#: what a pipeline folder publishes besides its components' configs and safetensors weights
PUBLISHED_FILES = ("model_index.json", "README.md", "training_info.json", "calibration.json")
COMPONENT_PATTERNS = ("config.json", *CONFIG_ONLY_FILES, "*.safetensors", "*.safetensors.index.json")


def publish_list(folder: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``(files to publish, files left out)`` of a pipeline folder, as relative POSIX paths.

    Only the pipeline is published: ``model_index.json``, the ``README.md`` card, ``training_info.json``
    and, for each component ``model_index.json`` lists, its config and safetensors weights. The folder
    is checked as ``mmdiff synthesize`` checks a pipeline (components from diffusers and mmdiff only,
    readable safetensors, no pickles), and any symbolic link in it is refused.
    """
    from .validation import PipelineError, check_pipeline_folder

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: pass the pipeline folder `mmdiff export` wrote")
    everything = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        for name in sorted(dirs) + sorted(files):
            path = Path(root) / name
            if path.is_symlink():
                raise PipelineError(f"{path} is a symbolic link: mmdiff push publishes regular files only; "
                                    "replace the link with the file, or remove it")
            if name in files:
                everything.append(path.relative_to(folder).as_posix())
    if not (folder / "model_index.json").exists():
        raise FileNotFoundError(f"{folder} is not a pipeline folder (no model_index.json): run `mmdiff export` first")
    if not (folder / "README.md").exists():
        raise FileNotFoundError(f"{folder} has no README.md model card: run `mmdiff export` to write one")
    index = check_pipeline_folder(folder)
    components = [name for name, entry in index.items()
                  if not name.startswith("_") and entry != [None, None]]
    allowed = set(PUBLISHED_FILES)
    for component in components:
        for pattern in COMPONENT_PATTERNS:
            allowed |= {p.relative_to(folder).as_posix() for p in (folder / component).glob(pattern) if p.is_file()}
    return sorted(f for f in everything if f in allowed), sorted(f for f in everything if f not in allowed)


def format_publish_list(folder: str | os.PathLike, files: list[str], left_out: list[str]) -> str:
    """What ``mmdiff push`` will upload, and what it leaves out, as lines for the terminal."""
    folder = Path(folder)
    sizes = {f: (folder / f).stat().st_size for f in files}
    lines = [f"{len(files)} file(s), {sum(sizes.values()) / 1e6:.2f} MB, from {folder}:"]
    lines += [f"  {f}  ({sizes[f]:,} bytes)" for f in files]
    if left_out:
        lines.append(f"left out (not part of the pipeline): {', '.join(left_out)}")
    return "\n".join(lines)


def push(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
         commit_message: str | None = None, revision: str | None = None, files: list[str] | None = None) -> str:
    """Upload a pipeline folder's :func:`publish_list` to the Hub (creating the repo if needed); returns
    the commit URL. ``files`` is a list :func:`publish_list` gave (default: made here)."""
    import contextlib

    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    allowed, _ = publish_list(folder)
    if files is None:
        files = allowed
    elif not set(files) <= set(allowed):
        raise ValueError(f"not part of the pipeline, never published: {sorted(set(files) - set(allowed))}")
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    api = HfApi(token=token)
    try:
        with contextlib.ExitStack() as stack:
            # opened without following links: a file swapped for a link after the check is refused
            operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=stack.enter_context(
                os.fdopen(os.open(folder / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), "rb")))
                for name in files]
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            commit = api.create_commit(repo_id=repo_id, operations=operations, repo_type="model", revision=revision,
                                       commit_message=commit_message or f"Upload {folder.name} with mmdiff push")
    except OfflineModeIsEnabled as exc:
        raise ValueError("HF_HUB_OFFLINE is set: unset it to push") from exc
    except HfHubHTTPError as exc:  # no or wrong token, no write access, hub unreachable
        raise ValueError(f"the Hub refused the upload to {repo_id} ({exc}); log in with `hf auth login` "
                         "or set HF_TOKEN to a token with write access") from exc
    return commit.commit_url
