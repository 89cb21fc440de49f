"""Checks that run before any model loads: files, options, output folders and pipeline folders.

Every problem is a :class:`ValueError` (or ``FileNotFoundError``/``FileExistsError``) whose message
names the file or option and says what to do; the CLI prints it as one line. Nothing here writes
anything but a probe file that is removed at once.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .io import Volume, VolumeError, is_nifti, load_volume
from .modalities import KNOWN_MODALITIES, canonical

#: the config files of pipeline components that have no weights: schedulers, and the intensity rule
#: (:class:`~mmdiff.data.preprocessing.MRIPreprocessor` takes its ``config_name`` from here)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
CONFIG_ONLY_FILES = ("scheduler_config.json", PREPROCESSOR_CONFIG)

#: pipeline classes mmdiff loads; components may only come from these libraries (no foreign code)
PIPELINE_CLASSES = ("MMDiffPipeline", "MMGANPipeline")
COMPONENT_LIBRARIES = ("diffusers", "mmdiff")
#: weight files that would need unpickling: never loaded
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: folders that are not real file systems: never an output folder
PSEUDO_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))
MAX_SEED = 2**63 - 1
_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class PipelineError(ValueError):
    """A pipeline folder or repo that mmdiff will not load, with the reason."""


def positive_int(value, option: str, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` as an int in ``[minimum, maximum]``, or a ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{option} must be a whole number, got {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise ValueError(f"{option} must be {bound}, got {value}")
    return int(value)


# ----------------------------------------------------------------------------------------- files

def check_input_files(inputs: Mapping[str, str | os.PathLike], brain_mask: str | os.PathLike | None = None
                      ) -> dict[str, Volume]:
    """Canonical sequence name -> its volume, read (in parallel) and checked: refuses what cannot be
    used, warns about constant volumes and about one image given for two sequences. The volumes go on
    to the pipeline as they are, so each file is read once."""
    if not inputs:
        raise ValueError("no input sequence given: pass at least one of "
                         + " ".join(f"--{m}" for m in KNOWN_MODALITIES) + " (or, for a cohort, mmdiff synthesize --cases)")
    checked: dict[str, Path] = {}
    for name, value in inputs.items():
        modality = canonical(name, KNOWN_MODALITIES)
        if modality in checked:
            raise ValueError(f"{modality} is given twice ({checked[modality]} and {value}): give each sequence once")
        checked[modality] = _existing_nifti(value, f"--{modality}")
    with ThreadPoolExecutor(max_workers=len(checked)) as pool:  # gzip inflation releases the GIL
        volumes = dict(zip(checked, pool.map(load_volume, checked.values())))
    data = {}
    for modality, path in checked.items():
        volume = volumes[modality]
        lo, hi = float(volume.data.min()), float(volume.data.max())
        if lo == hi:
            warnings.warn(f"{modality} ({path}) is constant (every voxel is {lo:g}): it carries no anatomy, "
                          "so the synthesis cannot use it; check that it is the right file", stacklevel=2)
        for other, (other_path, other_data) in data.items():
            if _same_file(path, other_path) or (other_data.shape == volume.data.shape
                                                 and np.array_equal(other_data, volume.data)):
                warnings.warn(f"{other} and {modality} are the same image ({other_path}, {path}): "
                              "each sequence should be its own file", stacklevel=2)
        data[modality] = (path, volume.data)
    if brain_mask is not None:
        mask = _existing_nifti(brain_mask, "--brain-mask")
        load_volume(mask)
    return volumes


def _existing_nifti(value, option: str) -> Path:
    path = Path(value)
    if not path.exists():
        raise FileNotFoundError(f"{option} {path}: no such file")
    if path.is_dir():
        raise VolumeError(f"{option} {path} is a folder: pass a NIfTI file (.nii or .nii.gz)")
    if not is_nifti(path):
        raise VolumeError(f"{option} {path}: not a NIfTI file (expected .nii or .nii.gz)")
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# -------------------------------------------------------------------------------- output folder

def check_output_folder(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> Path:
    """Refuse an output folder that is a file, an input, on a pseudo file system, or not writable."""
    out = Path(out)
    resolved = out.resolve()
    for root in PSEUDO_FILESYSTEMS:
        if resolved == root or root in resolved.parents:
            raise ValueError(f"--out {out} is under {root}, a system folder that holds no files: "
                             "choose a folder on a disk")
    for path in inputs:
        if path is not None and Path(path).resolve() == resolved:
            raise ValueError(f"--out {out} is one of the input files: choose an output folder")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder: choose an output folder")
    existing = out
    while not existing.exists():  # the nearest folder that exists: where the output folder will be made
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made there")
    try:
        fd, probe = tempfile.mkstemp(prefix=".mmdiff-write-probe-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write in {existing} ({exc.strerror or exc}): "
                         "choose a folder you can write to") from exc
    return out


# --------------------------------------------------------------------------------------- options

def check_flip_average(engine: str | None, flip_average: bool) -> None:
    """``--flip-average`` is the GAN engine's (the diffusion engine's predictor is calibrated as it is)."""
    if flip_average and engine == "ldm":
        raise ValueError("--flip-average is for the GAN engine (--engine gan); the diffusion engine's predictor "
                         "is calibrated as it is")


def check_synthesize_options(engine: str | None, steps: int | None, samples: int | None, batch_size: int, seed: int,
                             scheduler: str | None, targets: Iterable[str] | None, inputs: Iterable[str],
                             flip_average: bool = False) -> None:
    """The options of ``mmdiff synthesize``, before any file or model is read (``engine`` None: not
    known yet; the engine's own options are checked again once the pipeline folder names it; ``steps``
    and ``samples`` None: the pipeline's defaults)."""
    if engine is not None and engine not in ("ldm", "gan"):
        raise ValueError(f"unknown engine {engine!r}: choose ldm or gan")
    check_flip_average(engine, flip_average)
    if samples is not None:
        positive_int(samples, "--samples")
    positive_int(batch_size, "--batch-size")
    positive_int(seed, "--seed", minimum=0, maximum=MAX_SEED)
    if engine == "gan":
        if samples not in (None, 1):
            raise ValueError(f"--samples {samples} needs the diffusion engine: the GAN is deterministic "
                             "(one sample, no uncertainty); drop --samples or use --engine ldm")
        if scheduler is not None:
            raise ValueError("--scheduler is for the diffusion engine: drop it or use --engine ldm")
    elif engine == "ldm" and steps is not None:
        positive_int(steps, "--steps", maximum=1000)
    if targets:
        given = {canonical(m, KNOWN_MODALITIES) for m in inputs}
        seen = []
        for name in targets:
            target = canonical(name, KNOWN_MODALITIES)
            if target in given:
                raise ValueError(f"--targets {name}: {target} is an input; targets must be sequences the exam lacks")
            if target in seen:
                raise ValueError(f"--targets names {target} twice")
            seen.append(target)


# -------------------------------------------------------------------------------------- pipelines

def check_pipeline_source(source: str | os.PathLike) -> dict | None:
    """Check a pipeline folder, or a Hub repo id's cached snapshot when there is one; returns its
    model_index (None for a repo that is not cached yet: it is checked by the download)."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise PipelineError(f"--pipeline {path} is a file: pass a pipeline folder (holding model_index.json)")
        return check_pipeline_folder(path)
    text = str(source)
    if not _REPO_ID.match(text) or text.startswith((".", "~")):
        raise FileNotFoundError(f"--pipeline {source}: no such pipeline folder (and not a Hub repo id ORG/NAME)")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(text, "model_index.json")
    if isinstance(cached, str):
        return check_pipeline_folder(Path(cached).parent)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise PipelineError(f"--pipeline {text}: no such folder, and the Hub repo {text} is not in the local "
                            "cache while HF_HUB_OFFLINE is set: pass a pipeline folder, or unset HF_HUB_OFFLINE "
                            "to download it")
    return None


def check_pipeline_folder(path: str | os.PathLike) -> dict:
    """Refuse a pipeline folder mmdiff should not load; returns its model_index.

    It must have a JSON ``model_index.json`` naming an mmdiff pipeline, components only from diffusers
    and mmdiff, each with a JSON config, and weights as readable safetensors (never pickles).
    """
    path = Path(path)
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise PipelineError(f"{path} is not a pipeline folder (no model_index.json): pass the folder "
                            "`mmdiff export` or `save_pretrained` wrote")
    index = _read_json(index_file, "re-export the pipeline (mmdiff export)")
    if not isinstance(index, dict) or index.get("_class_name") not in PIPELINE_CLASSES:
        name = index.get("_class_name") if isinstance(index, dict) else None
        raise PipelineError(f"{index_file} names pipeline {name!r}; mmdiff loads {' or '.join(PIPELINE_CLASSES)} "
                            "only: pass an mmdiff pipeline folder")
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue  # the pipeline's own settings (the diffusion pipeline's calibration, say): no code
        if len(entry) != 2:
            raise PipelineError(f"{index_file}: component {name!r} is {entry!r}, not [library, class]: "
                                "re-export the pipeline")
        library, class_name = entry
        if library is None and class_name is None:
            continue
        if not (_COMPONENT_NAME.match(name) and isinstance(library, str) and isinstance(class_name, str)
                and library.split(".")[0] in COMPONENT_LIBRARIES):
            raise PipelineError(f"{index_file}: component {name!r} comes from {library!r}; mmdiff loads only "
                                f"{' and '.join(COMPONENT_LIBRARIES)} classes (no foreign code)")
        _check_component(path / name, name)
    return index


def _check_component(folder: Path, name: str) -> None:
    if not folder.is_dir():
        raise PipelineError(f"{folder}: component {name} is missing: re-export the pipeline")
    configs = [folder / c for c in ("config.json", *CONFIG_ONLY_FILES) if (folder / c).is_file()]
    if not configs:
        raise PipelineError(f"{folder} has no config.json: re-export the pipeline")
    for config in configs:
        _read_json(config, "re-export the pipeline")
    if configs[0].name in CONFIG_ONLY_FILES:
        return  # schedulers and the preprocessor have no weights
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise PipelineError(f"{folder}: weights {', '.join(pickles)} are pickle files, which mmdiff never "
                                "loads (they can run code); convert them to safetensors (save_pretrained with "
                                "safe_serialization=True) from a source you trust")
        raise PipelineError(f"{folder} has no .safetensors weights: re-export the pipeline")
    from safetensors import safe_open

    for file in weights:
        try:
            with safe_open(str(file), framework="pt") as handle:
                handle.keys()
        except Exception as exc:  # safetensors raises its own error type for a bad header or size
            raise PipelineError(f"{file} is corrupt or truncated ({exc}): download or export it again") from exc


def _read_json(path: Path, what_to_do: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{path} is not valid JSON ({exc}): {what_to_do}") from exc
