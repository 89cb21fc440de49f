"""The browser demo (``mmdiff demo``; ``app.py`` serves it as a Hugging Face Space).

A visitor picks a bundled example (a phantom case of each simulated site, generated at start-up
with :mod:`mmdiff.data.phantom` and cached on disk) or uploads NIfTI files, one per sequence;
chooses the dataset profile (one of the model's datasets, or "unknown site"), the sequences to
synthesize and the engine (the one-step GAN, the default on a CPU, or latent diffusion with its
steps and samples); then sees the inputs, the synthesized sequences and, for diffusion (with an
error model, or several samples), the calibrated uncertainty side by side in three planes with a slice slider, and downloads the
synthesized NIfTI files with their JSON sidecars.

Synthesis goes through :func:`mmdiff.synthesize.synthesize`, so a downloaded file is marked synthetic
and carries the same provenance as one written by ``mmdiff synthesize``. Uploads are checked before
anything runs (type, size, 3D, voxel count, finite values, overlapping grids) and every problem is a
one-line message in the page. An upload's name never reaches the file system: each visitor's files
are copied to ``<modality>.nii[.gz]`` in a temporary folder of their own, removed when they run
again, leave the page or the server stops.

gradio is an optional dependency (``pip install "mmdiff[demo]"``); importing this module does not
need it, building the app does.
"""

# no `from __future__ import annotations`: gradio reads the handlers' `gr.Request` annotations at run time
import atexit
import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import __version__
from .modalities import DESCRIPTIONS, KNOWN_MODALITIES, MODALITIES

log = logging.getLogger(__name__)

UNKNOWN_SITE = "unknown site"
ENGINE_LABELS = {"gan": "one-step GAN (fast)", "ldm": "latent diffusion (with uncertainty)"}
PLANES = {"axial": 2, "coronal": 1, "sagittal": 0}
#: an upload larger than this is refused (also gradio's own upload limit); env MMDIFF_DEMO_MAX_UPLOAD_MB
MAX_UPLOAD_MB = float(os.environ.get("MMDIFF_DEMO_MAX_UPLOAD_MB", 200))
#: a volume with more voxels than this is refused (a 256^3 volume has 16.8 M)
MAX_VOXELS = int(os.environ.get("MMDIFF_DEMO_MAX_VOXELS", 40_000_000))
#: diffusion defaults for a pipeline not calibrated for a K: the pipeline's own (``MMDiffPipeline.__call__``'s
#: steps and ``DEFAULT_NUM_SAMPLES``; written here so the page builds without importing torch; a test keeps
#: them equal). A calibrated pipeline's samples slider starts at its ``default_num_samples``.
DEFAULT_STEPS, DEFAULT_SAMPLES, MAX_STEPS, MAX_SAMPLES = 6, 2, 50, 8
#: bump when the bundled examples change, so cached copies are rebuilt
EXAMPLES_VERSION = 1

DISCLAIMER = ("Synthesized images are not acquired images: every file says so in its NIfTI header and "
              "JSON sidecar. For research, not for diagnosis.")


class DemoInputError(ValueError):
    """A problem with what a visitor gave, said in one line for the page."""


# ----------------------------------------------------------------------------------------- examples


@dataclass
class Example:
    """A bundled example: files per sequence, its dataset profile and the sequences it leaves out."""

    label: str
    cohort: str
    dataset: str
    files: dict[str, Path]
    targets: list[str]


#: per cohort: the sequences given as inputs (the rest of the case's sequences become the targets)
EXAMPLE_INPUTS = {"glioma": ("t1", "t2", "flair"), "bratslike": ("t1", "t2", "flair"),
                  "immune": None, "stroke": ("dwi", "adc")}
EXAMPLE_SLAB_MM = 64.0


def default_example_dir() -> Path:
    """Where bundled examples are cached: ``$MMDIFF_DEMO_CACHE`` or the system temp folder."""
    root = Path(os.environ.get("MMDIFF_DEMO_CACHE") or tempfile.gettempdir())
    return root / "mmdiff-demo-examples"


def _slab(case, slab_mm: float):
    """A phantom case cut to the brain's bounding box in plane and ``slab_mm`` of axial slices around
    its lesion (or the brain's centre), skull-stripped as the models expect: ``(images, affine)``."""
    brain = case.brain_mask > 0
    spacing = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    lo = np.argwhere(brain).min(0)
    hi = np.argwhere(brain).max(0) + 1
    lo[:2] = np.maximum(lo[:2] - 4, 0)
    hi[:2] = np.minimum(hi[:2] + 4, brain.shape[:2])
    lesion = case.seg > 0
    centre = int(np.argwhere(lesion)[:, 2].mean()) if lesion.any() else (lo[2] + hi[2]) // 2
    half = max(1, int(round(slab_mm / spacing[2] / 2)))
    z0, z1 = max(lo[2], centre - half), min(hi[2], centre + half)
    box = (slice(lo[0], hi[0]), slice(lo[1], hi[1]), slice(z0, z1))
    affine = case.affine.copy()
    affine[:3, 3] = case.affine[:3, :3] @ np.array([lo[0], lo[1], z0]) + case.affine[:3, 3]
    images = {m: (v * brain)[box] for m, v in case.images.items()}
    return images, affine


def build_examples(folder: str | os.PathLike | None = None, cohorts: Sequence[str] | None = None, seed: int = 0,
                   slab_mm: float = EXAMPLE_SLAB_MM) -> list[Example]:
    """Phantom examples (case 0 of each cohort), written once under ``folder`` and reused afterwards.

    Each example is skull-stripped and cut to ``slab_mm`` of axial slices around its lesion, so it is
    small and fast; each cohort's files appear whole or not at all (safe with concurrent start-ups).
    """
    from .data.phantom import COHORTS, simulate_case
    from .io import atomic_dir, save_nifti

    folder = Path(folder) if folder is not None else default_example_dir()
    folder = folder / f"v{EXAMPLES_VERSION}-mmdiff{__version__}-seed{seed}-slab{slab_mm:g}"
    examples = []
    for cohort in cohorts if cohorts is not None else list(COHORTS):
        if cohort not in COHORTS:
            raise ValueError(f"unknown phantom cohort {cohort!r}: known are {', '.join(COHORTS)}")
        target = folder / cohort
        if not (target / "done").exists():
            case = simulate_case(cohort, 0, seed=seed)
            images, affine = _slab(case, slab_mm)
            with atomic_dir(target) as tmp:
                for m, data in images.items():
                    save_nifti(data, affine, tmp / f"{cohort}_{m}.nii.gz", dtype=np.int16,
                               descrip=f"mmdiff phantom (simulated) {cohort}")
                (tmp / "done").write_text("ok\n")
        present = [m for m in MODALITIES if (target / f"{cohort}_{m}.nii.gz").exists()]
        given = [m for m in (EXAMPLE_INPUTS.get(cohort) or present[:-1]) if m in present] or present[:1]
        targets = [m for m in present if m not in given]
        label = (f"{cohort} phantom: {' + '.join(m.upper() for m in given)}"
                 + (f" -> {' + '.join(m.upper() for m in targets)}" if targets else ""))
        examples.append(Example(label, cohort, cohort, {m: target / f"{cohort}_{m}.nii.gz" for m in given}, targets))
    return examples


# ------------------------------------------------------------------------------------------ engines


def dataset_names(pipe) -> list[str]:
    """The dataset names a pipeline's networks were trained with (``config.dataset_names`` of a component)."""
    for component in pipe.components.values():
        names = getattr(getattr(component, "config", None), "dataset_names", None)
        if names:
            return [str(n) for n in names]
    return []


@dataclass
class Engine:
    name: str
    pipeline: object
    source: str  # the folder or Hub repo id it came from (what the provenance records)

    @property
    def modalities(self) -> list[str]:
        return list(self.pipeline.modalities)

    @property
    def datasets(self) -> list[str]:
        return dataset_names(self.pipeline)


def load_engines(sources: Mapping[str, str | os.PathLike | None] | None = None,
                 engines: Sequence[str] = ("gan", "ldm")) -> dict[str, Engine]:
    """The demo's pipelines: ``sources`` maps an engine to a folder or Hub repo id; default: the environment
    (``MMDIFF_GAN_PIPELINE``, ``MMDIFF_LDM_PIPELINE``), else the published pipelines. An engine whose
    pipeline cannot be found is left out with a warning; none at all is an error."""
    from .pipelines import load_pipeline, resolve_source

    sources = dict(sources or {})
    loaded, errors = {}, []
    for engine in engines:
        given = sources.get(engine) or os.environ.get(f"MMDIFF_{engine.upper()}_PIPELINE") or None
        try:
            source = resolve_source(given, engine)  # the published pipeline when none is given
            pipe = load_pipeline(source, engine)
        except (OSError, ValueError) as exc:
            errors.append(f"{engine}: {exc}")
            log.warning("demo: the %s engine is not available (%s)", engine, exc)
            continue
        loaded[engine] = Engine(engine, pipe, str(source))
    if not loaded:
        raise FileNotFoundError("no pipeline could be loaded for the demo: " + "; ".join(errors))
    return loaded


# ------------------------------------------------------------------------------------------ uploads

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def display_name(path: str | os.PathLike | None) -> str:
    """An uploaded file's name as the page may show it: its base name, odd characters replaced, cut short.
    It is only ever shown; the file system sees ``<modality>.nii[.gz]``."""
    name = _SAFE.sub("_", Path(str(path or "")).name).strip("._") or "file"
    return name if len(name) <= 60 else name[:28] + "..." + name[-28:]


def _suffix(path: str | os.PathLike) -> str | None:
    lower = str(path).lower()
    return ".nii.gz" if lower.endswith(".nii.gz") else ".nii" if lower.endswith(".nii") else None


@dataclass
class CheckedInput:
    name: str  # the modality, or "brain mask"
    path: Path  # the uploaded file, where gradio keeps it
    shown: str  # its display name
    volume: object  # mmdiff.io.Volume (canonical)


def check_upload(label: str, path: str | os.PathLike, max_mb: float = MAX_UPLOAD_MB,
                 max_voxels: int = MAX_VOXELS) -> CheckedInput:
    """Read one upload, or raise :class:`DemoInputError` with a one-line reason."""
    import nibabel as nib

    from .io import VolumeError, load_volume

    shown = display_name(path)
    what = f"{label.upper() if label in KNOWN_MODALITIES else label} ({shown})"
    if _suffix(path) is None:
        raise DemoInputError(f"{what} is not a NIfTI file: upload .nii or .nii.gz")
    size = os.path.getsize(path)
    if size > max_mb * 2**20:
        raise DemoInputError(f"{what} is {size / 2**20:.0f} MB; the limit is {max_mb:g} MB")
    try:
        image = nib.load(str(path))
        shape = tuple(int(n) for n in image.shape)
    except Exception:
        raise DemoInputError(f"{what} cannot be read as NIfTI (damaged or not a NIfTI file)") from None
    if len(shape) == 4 and shape[3] != 1 or len(shape) > 4:
        raise DemoInputError(f"{what} is {len(shape)}D with shape {shape}: upload one 3D volume per sequence "
                             "(e.g. the b=1000 trace of a DWI series)")
    if len(shape) < 3:
        raise DemoInputError(f"{what} is {len(shape)}D with shape {shape}: upload a 3D volume")
    voxels = int(np.prod(shape[:3]))
    if voxels > max_voxels:
        raise DemoInputError(f"{what} has {voxels / 1e6:.0f} M voxels; the limit is {max_voxels / 1e6:.0f} M")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            volume = load_volume(path)
    except VolumeError:
        raise DemoInputError(f"{what} cannot be read as a 3D NIfTI volume") from None
    except Exception:
        raise DemoInputError(f"{what} cannot be read (its voxel data are damaged)") from None
    if volume.nonfinite == voxels:
        raise DemoInputError(f"{what} holds no numbers: every voxel is NaN or infinite")
    if not np.any(volume.data):
        raise DemoInputError(f"{what} is empty: every voxel is 0")
    return CheckedInput(label, Path(path), shown, volume)


def check_inputs(uploads: Mapping[str, str | os.PathLike | None], modalities: Sequence[str],
                 brain_mask: str | os.PathLike | None = None, max_mb: float = MAX_UPLOAD_MB,
                 max_voxels: int = MAX_VOXELS) -> tuple[dict[str, CheckedInput], CheckedInput | None, list[str]]:
    """Check a visitor's uploads: ``(inputs by modality, brain mask or None, notes)``, or
    :class:`DemoInputError` listing every problem, one per line."""
    from .data.prepare import grids_overlap

    problems, notes, checked = [], [], {}
    given = {m: p for m, p in uploads.items() if p}
    if not given:
        raise DemoInputError("upload at least one sequence, or pick an example")
    for m in given:
        if m not in modalities:
            problems.append(f"{m.upper()}: this model does not take {m.upper()} as input "
                            f"(it knows {', '.join(x.upper() for x in modalities)})")
    mask = None
    items = [(m, given[m]) for m in modalities if m in given] + ([("brain mask", brain_mask)] if brain_mask else [])
    for label, path in items:
        try:
            item = check_upload(label, path, max_mb, max_voxels)
        except DemoInputError as exc:
            problems.append(str(exc))
            continue
        if item.volume.nonfinite:
            notes.append(f"{label.upper() if label in KNOWN_MODALITIES else label} ({item.shown}): "
                         f"{item.volume.nonfinite} NaN/Inf voxels were set to 0")
        if label == "brain mask":
            mask = item
        else:
            checked[label] = item
    if checked:
        reference = next(iter(checked.values()))
        for item in list(checked.values())[1:] + ([mask] if mask else []):
            if not grids_overlap(item.volume, reference.volume):
                problems.append(f"{item.name.upper() if item.name in KNOWN_MODALITIES else item.name} ({item.shown}) "
                                f"does not overlap {reference.name.upper()} ({reference.shown}) in space: "
                                "upload sequences of one exam (their affines place them apart)")
    if problems:
        raise DemoInputError("\n".join(problems))
    return checked, mask, notes


# ------------------------------------------------------------------------------------------ display


@dataclass
class Result:
    """What the page shows of a run: uint8 display volumes on the output grid, and where its files are."""

    folder: Path
    spacing: tuple[float, float, float]
    inputs: dict[str, np.ndarray] = field(default_factory=dict)
    synthetic: dict[str, np.ndarray] = field(default_factory=dict)
    uncertainty: dict[str, np.ndarray] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return next(iter(self.synthetic.values())).shape

    def centre(self, plane: str) -> int:
        """The middle of the synthesized brain along the plane's axis."""
        axis = PLANES[plane]
        volume = next(iter(self.synthetic.values()))
        nonzero = np.flatnonzero(volume.any(axis=tuple(a for a in range(3) if a != axis)))
        return int((nonzero[0] + nonzero[-1]) // 2) if nonzero.size else volume.shape[axis] // 2


def _to_uint8(data: np.ndarray, high: float | None = None) -> np.ndarray:
    """A volume scaled to uint8 between 0 and ``high`` (default: its 99.5th percentile inside non-zero voxels)."""
    data = np.nan_to_num(np.asarray(data, dtype=np.float32))
    if high is None:
        inside = data[data > 0]
        high = float(np.percentile(inside, 99.5)) if inside.size else 1.0
    return (np.clip(data / max(high, 1e-6), 0, 1) * 255).astype(np.uint8)


def _on_grid(volume, reference) -> np.ndarray:
    """A canonical volume's data on the reference's canonical grid (linear, by the affines)."""
    import nibabel as nib
    from nibabel.processing import resample_from_to

    from .data.prepare import same_grid

    if same_grid(volume, reference):
        return volume.data
    image = nib.Nifti1Image(volume.data, volume.affine)
    return resample_from_to(image, (reference.shape, reference.affine), order=1, cval=0.0).get_fdata(dtype=np.float32)


_MAGMA = None


def _colour(slice_u8: np.ndarray) -> np.ndarray:
    """uint8 -> RGB with matplotlib's magma (a lookup table), for uncertainty maps."""
    global _MAGMA
    if _MAGMA is None:
        try:
            from matplotlib import colormaps

            _MAGMA = (colormaps["magma"](np.arange(256))[:, :3] * 255).astype(np.uint8)
        except ImportError:  # grey without matplotlib
            _MAGMA = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    return _MAGMA[slice_u8]


def render_slice(volume: np.ndarray, plane: str, index: int, spacing: Sequence[float], colour: bool = False,
                 size: int = 256):
    """One slice of a canonical uint8 volume as a PIL image in radiological display order, with the
    physical aspect ratio, its longer side ``size`` pixels."""
    from PIL import Image

    from .viz import display

    axis = PLANES[plane]
    index = int(np.clip(index, 0, volume.shape[axis] - 1))
    sl = display(volume, axis, index)
    image = Image.fromarray(_colour(sl) if colour else sl)
    # display() puts the first remaining axis along the columns and the second along the rows
    rest = [a for a in range(3) if a != axis]
    width_mm, height_mm = sl.shape[1] * spacing[rest[0]], sl.shape[0] * spacing[rest[1]]
    scale = size / max(width_mm, height_mm)
    return image.resize((max(1, round(width_mm * scale)), max(1, round(height_mm * scale))), Image.BILINEAR)


def render(result: Result | None, plane: str, index: int):
    """Three galleries' values: inputs, synthesized, uncertainty (each a list of (image, caption))."""
    if result is None:
        return [], [], []
    spacing = result.spacing

    def panels(volumes, suffix, colour=False):
        return [(render_slice(v, plane, index, spacing, colour), f"{m.upper()} {suffix}") for m, v in volumes.items()]

    return (panels(result.inputs, "(input)"), panels(result.synthetic, "(synthetic)"),
            panels(result.uncertainty, "uncertainty (calibrated)", colour=True))


# ---------------------------------------------------------------------------------------- sessions


class Sessions:
    """Per-visitor temporary folders under one root: ``root/<hash of the session>/run-<n>``.

    A new run removes the visitor's earlier runs; leaving the page removes the visitor's folder; the
    root goes when the process ends.
    """

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="mmdiff-demo-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self._count = 0
        self._lock = threading.Lock()
        atexit.register(shutil.rmtree, self.root, True)

    def folder(self, session: str | None) -> Path:
        key = hashlib.sha256((session or "anonymous").encode()).hexdigest()[:16]
        return self.root / key

    def new_run(self, session: str | None) -> Path:
        folder = self.folder(session)
        if folder.exists():
            for old in folder.iterdir():
                shutil.rmtree(old, ignore_errors=True)
        with self._lock:
            self._count += 1
            run = folder / f"run-{self._count}"
        run.mkdir(parents=True)
        return run

    def remove(self, session: str | None) -> None:
        shutil.rmtree(self.folder(session), ignore_errors=True)

    def remove_run(self, result: Result | None) -> None:
        if isinstance(result, Result):
            shutil.rmtree(result.folder, ignore_errors=True)


# -------------------------------------------------------------------------------------------- runs


def run_synthesis(engine: Engine, uploads: Mapping[str, str | os.PathLike | None], folder: Path,
                  dataset: str | None = None, targets: Sequence[str] | None = None, steps: int = DEFAULT_STEPS,
                  samples: int | None = None, seed: int = 0, brain_mask: str | os.PathLike | None = None,
                  max_mb: float = MAX_UPLOAD_MB, max_voxels: int = MAX_VOXELS,
                  flip_average: bool = False) -> tuple[Result, list[str]]:
    """Check the uploads, copy them into ``folder`` under safe names, synthesize with
    :func:`mmdiff.synthesize.synthesize` and read the results back for display: ``(result, notes)``.
    ``flip_average`` (the GAN only; ignored for diffusion) looks at every slice twice, mirrored.
    Bad input raises :class:`DemoInputError`."""
    from .io import load_volume, sidecar_path
    from .synthesize import synthesize

    modalities = engine.modalities
    checked, mask, notes = check_inputs(uploads, modalities, brain_mask, max_mb, max_voxels)
    wanted = [t for t in targets or [] if t in modalities]
    for t in [t for t in wanted if t in checked]:
        notes.append(f"{t.upper()} was uploaded, so it is an input, not a target")
    wanted = [t for t in wanted if t not in checked] or [m for m in modalities if m not in checked]
    if not wanted:
        raise DemoInputError("every sequence the model knows was uploaded: there is nothing to synthesize")
    if dataset is not None and dataset.lower() not in [d.lower() for d in engine.datasets]:
        notes.append(f"the {engine.name} model does not know the dataset {dataset!r}: used as an unknown site")
        dataset = None
    # None: the pipeline's own K (the one its uncertainty was calibrated at)
    samples = (None if samples is None else max(1, int(samples))) if engine.name == "ldm" else 1
    steps = max(1, int(steps))

    inputs_dir, out = folder / "inputs", folder / "synthetic"
    inputs_dir.mkdir(parents=True, exist_ok=True)
    copies = {}
    for m, item in checked.items():  # the file system only ever sees mmdiff's own names
        copies[m] = inputs_dir / f"{m}{_suffix(item.path)}"
        shutil.copyfile(item.path, copies[m])
    mask_copy = None
    if mask is not None:
        mask_copy = inputs_dir / f"brainmask{_suffix(mask.path)}"
        shutil.copyfile(mask.path, mask_copy)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        written = synthesize(copies, out, pipeline=engine.pipeline, pipeline_source=engine.source, engine=engine.name,
                             dataset=dataset, targets=wanted, steps=steps, samples=samples, seed=int(seed),
                             brain_mask=mask_copy, flip_average=bool(flip_average) and engine.name == "gan")
    for w in caught:
        text = str(w.message).replace(str(inputs_dir) + os.sep, "")
        if not issubclass(w.category, UserWarning) or text in notes:
            continue
        notes.append(text)

    first = next(iter(written.values()))
    reference = load_volume(first)
    result = Result(folder, reference.spacing)
    for m, item in checked.items():
        result.inputs[m] = _to_uint8(_on_grid(item.volume, reference))
    for name, path in written.items():
        target, _, kind = name.partition("_")
        volume = load_volume(path).data
        if kind:
            result.uncertainty[target] = _to_uint8(volume)
        else:
            result.synthetic[target] = _to_uint8(volume, high=1.0)
    files = []
    for path in written.values():
        files += [str(path), str(sidecar_path(path))]
    result.files = files
    return result, notes


# -------------------------------------------------------------------------------------------- page


def build_demo(engines: Mapping[str, Engine] | None = None, examples: Sequence[Example] | None = None,
               example_cohorts: Sequence[str] | None = None, sessions: Sessions | None = None,
               default_engine: str = "gan", max_mb: float = MAX_UPLOAD_MB, max_voxels: int = MAX_VOXELS):
    """The gradio app. ``engines`` default to :func:`load_engines`, ``examples`` to :func:`build_examples`
    over ``example_cohorts`` (default: every cohort). Launch it with :func:`launch`."""
    import gradio as gr

    engines = dict(engines) if engines is not None else load_engines()
    if examples is None:
        examples = build_examples(cohorts=example_cohorts)
    sessions = sessions or Sessions()
    default_engine = default_engine if default_engine in engines else next(iter(engines))
    modalities = list(dict.fromkeys(m for e in engines.values() for m in e.modalities))
    datasets = list(dict.fromkeys(d for e in engines.values() for d in e.datasets))
    # the diffusion pipeline's own K (its calibration's), so the page starts where the stated interval holds
    default_samples = int(getattr(engines["ldm"].pipeline, "default_num_samples", DEFAULT_SAMPLES)
                          if "ldm" in engines else DEFAULT_SAMPLES)

    for e in engines.values():
        with contextlib.suppress(Exception):
            e.pipeline.set_progress_bar_config(desc="synthesizing slice batches")

    def message(kind: str, lines: Sequence[str]) -> str:
        lines = [line for text in lines for line in str(text).splitlines() if line.strip()]
        if not lines:
            return ""
        head = {"error": "**Cannot synthesize:**", "note": "**Notes:**", "done": "**Done.**"}[kind]
        return head + "\n" + "\n".join(f"- {line}" for line in lines)

    def views(result, plane, index):
        """Gallery updates: one column per sequence, the same in every row so the rows line up."""
        shown = render(result, plane, index)
        columns = max(1, min(6, max((len(x) for x in shown), default=1)))
        return (gr.update(value=shown[0], columns=columns), gr.update(value=shown[1], columns=columns),
                gr.update(value=shown[2], columns=columns, visible=bool(shown[2])))

    def failed(text):
        return (message("error", [text]), gr.update(value=[]), gr.update(value=[]), gr.update(value=[], visible=False),
                None, gr.update(), None)

    def synthesize_page(request: gr.Request, progress=gr.Progress(track_tqdm=True), *values):
        # gradio puts the request and the progress tracker first; ``values`` follow the event's inputs
        files = dict(zip(modalities, values[:len(modalities)]))
        mask, dataset, targets, engine_label, steps, samples, seed, look_twice, plane, previous = values[len(modalities):]
        engine = next((e for name, e in engines.items() if ENGINE_LABELS[name] == engine_label), None)
        if engine is None:
            return failed(f"unknown engine {engine_label!r}")
        sessions.remove_run(previous)
        folder = sessions.new_run(getattr(request, "session_hash", None))
        progress(0.02, desc="checking the uploads")
        started = time.perf_counter()
        try:
            result, notes = run_synthesis(engine, files, folder, None if dataset in (None, UNKNOWN_SITE) else dataset,
                                          targets, steps, samples, seed, mask, max_mb, max_voxels,
                                          flip_average=bool(look_twice))
        except DemoInputError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            return failed(str(exc))
        except Exception as exc:  # never a stack trace in the page; the server log has it
            log.exception("demo: synthesis failed")
            shutil.rmtree(folder, ignore_errors=True)
            return failed(f"synthesis failed: {(str(exc).splitlines() or [type(exc).__name__])[0][:300]}")
        seconds = time.perf_counter() - started
        index = result.centre(plane)
        done = [f"{', '.join(t.upper() for t in result.synthetic)} synthesized from "
                f"{', '.join(m.upper() for m in result.inputs)} with the {ENGINE_LABELS[engine.name]}"
                + (f" ({int(steps)} steps, {int(samples)} samples)" if engine.name == "ldm" else
                   " (looking twice: mirrored and averaged)" if look_twice else "")
                + f" in {seconds:.0f} s; download the NIfTI files and their JSON sidecars below.", DISCLAIMER]
        status = message("done", done) + ("\n\n" + message("note", notes) if notes else "")
        slider = gr.update(maximum=result.shape[PLANES[plane]] - 1, value=index)
        return (status, *views(result, plane, index), result.files, slider, result)

    def change_plane(plane, result):
        if result is None:
            return gr.update(), gr.update(), gr.update(), gr.update()
        index = result.centre(plane)
        return (gr.update(maximum=result.shape[PLANES[plane]] - 1, value=index), *views(result, plane, index))

    def change_slice(plane, index, result):
        if result is None:
            return gr.update(), gr.update(), gr.update()
        return views(result, plane, index)

    def leave(request: gr.Request):
        sessions.remove(getattr(request, "session_hash", None))

    with gr.Blocks(title="mmdiff: fill in missing MRI sequences", delete_cache=(600, 3600)) as demo:
        gr.Markdown(
            "# mmdiff: fill in missing MRI sequences\n"
            "Give the sequences an exam has (T1, T2, T1C, FLAIR, DWI, ADC as skull-stripped NIfTI, about 1 mm in "
            "plane, one 3D file per sequence) and mmdiff synthesizes the missing ones, with one model for scans "
            "from many sites. Pick an example or upload your own files, then press **Synthesize**.\n\n"
            f"> {DISCLAIMER}")
        result_state = gr.State(None, delete_callback=sessions.remove_run, time_to_live=3 * 3600)
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=360):
                gr.Markdown("**Sequences of the exam**: " + "; ".join(f"{m.upper()} {DESCRIPTIONS.get(m, '')}".strip()
                                                                     for m in modalities), elem_id="sequences")
                uploads = {}
                for row in range(0, len(modalities), 3):
                    with gr.Row():
                        for m in modalities[row:row + 3]:
                            uploads[m] = gr.File(label=m.upper(),
                                                 file_types=[".nii", ".gz"], type="filepath", height=120,
                                                 min_width=150, elem_id=f"upload-{m}")
                with gr.Accordion("Brain mask (optional)", open=False):
                    mask = gr.File(label="brain mask on the inputs' grid (for heads that are not skull-stripped)",
                                   file_types=[".nii", ".gz"], type="filepath", height=120, elem_id="upload-mask")
                examples_anchor = gr.Column()
            with gr.Column(scale=2, min_width=360):
                dataset = gr.Dropdown(datasets + [UNKNOWN_SITE], value=UNKNOWN_SITE, label="Dataset profile",
                                      info="the site the scans come from if the model was trained on it, "
                                           "else 'unknown site'", elem_id="dataset")
                targets = gr.CheckboxGroup(modalities, value=[], label="Sequences to synthesize",
                                           info="none ticked: every sequence not uploaded", elem_id="targets")
                engine = gr.Radio([ENGINE_LABELS[e] for e in engines], value=ENGINE_LABELS[default_engine],
                                  label="Engine", info="the GAN takes seconds on a CPU; diffusion about twice as "
                                                       "long at one sample, more with more",
                                  elem_id="engine")
                with gr.Group(visible=default_engine == "ldm") as diffusion_settings:
                    steps = gr.Slider(1, MAX_STEPS, value=DEFAULT_STEPS, step=1, label="Diffusion steps",
                                      elem_id="steps")
                    samples = gr.Slider(1, MAX_SAMPLES, value=default_samples, step=1,
                                        label="Samples (K: the model's own is where its uncertainty is calibrated; "
                                              "more than 1 adds their spread to it)", elem_id="samples")
                look_twice = gr.Checkbox(False, label="Look twice: also run every slice mirrored left-right and "
                                                      "average (a better image, twice the network time)",
                                         visible=default_engine == "gan", elem_id="flip-average")
                seed = gr.Number(0, precision=0, label="Seed", minimum=0, elem_id="seed")
                run = gr.Button("Synthesize", variant="primary", elem_id="run")
                status = gr.Markdown(elem_id="status")
                downloads = gr.File(label="Synthesized NIfTI files and JSON sidecars", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        with examples_anchor:
            if examples:
                gr.Examples([[str(ex.files[m]) if m in ex.files else None for m in modalities]
                             + [ex.dataset if ex.dataset in datasets else UNKNOWN_SITE, ex.targets] for ex in examples],
                            inputs=[*uploads.values(), dataset, targets], example_labels=[ex.label for ex in examples],
                            label="Examples: simulated phantom exams, one per kind of site", elem_id="examples")
        with gr.Row():
            plane = gr.Radio(list(PLANES), value="axial", label="Plane", elem_id="plane", scale=1)
            slice_index = gr.Slider(0, 1, value=0, step=1, label="Slice", elem_id="slice", scale=3)
        gallery = {"columns": 3, "fit_columns": False, "height": "auto", "object_fit": "contain"}
        shown_inputs = gr.Gallery(label="Inputs", elem_id="inputs-gallery", **gallery)
        shown_synth = gr.Gallery(label="Synthesized (marked synthetic in every file)", elem_id="synthetic-gallery",
                                 **gallery)
        shown_unc = gr.Gallery(label="Uncertainty: the calibrated interval half-width (the error model's scale and the samples' spread)", visible=False,
                               elem_id="uncertainty-gallery", **gallery)

        engine.change(lambda label: (gr.update(visible=label == ENGINE_LABELS["ldm"]),
                                     gr.update(visible=label == ENGINE_LABELS["gan"])),
                      engine, [diffusion_settings, look_twice], queue=False, api_name=False)
        run.click(synthesize_page,
                  [*uploads.values(), mask, dataset, targets, engine, steps, samples, seed, look_twice, plane,
                   result_state],
                  [status, shown_inputs, shown_synth, shown_unc, downloads, slice_index, result_state],
                  api_name="synthesize", concurrency_limit=1, concurrency_id="synthesis", show_progress_on=[status])
        plane.change(change_plane, [plane, result_state], [slice_index, shown_inputs, shown_synth, shown_unc],
                     api_name=False, concurrency_limit=8, concurrency_id="view", show_progress="hidden")
        slice_index.release(change_slice, [plane, slice_index, result_state], [shown_inputs, shown_synth, shown_unc],
                            api_name=False, concurrency_limit=8, concurrency_id="view", trigger_mode="always_last",
                            show_progress="hidden")
        demo.unload(leave)
    demo.queue(default_concurrency_limit=1, max_size=32)
    demo.mmdiff_sessions = sessions  # for launch() and the tests
    demo.mmdiff_examples = list(examples)
    return demo


def launch(demo=None, server_name: str | None = None, server_port: int | None = None, share: bool = False,
           max_mb: float = MAX_UPLOAD_MB, **kwargs):
    """Serve the demo (default: :func:`build_demo`); gradio's own upload limit is ``max_mb``."""
    demo = demo if demo is not None else build_demo()
    allowed = [str(p) for p in {default_example_dir(), *(Path(ex.files[m]).parent.parent
                                                         for ex in getattr(demo, "mmdiff_examples", [])
                                                         for m in ex.files)}]
    return demo.launch(server_name=server_name, server_port=server_port, share=share,
                       max_file_size=f"{int(max_mb)}mb", allowed_paths=allowed, **kwargs)

