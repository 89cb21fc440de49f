"""Property-based sweep (issue 14): malformed volumes and options through ``mmdiff synthesize`` (in process)
and through the pipelines. Each example gets a correct result or a one-line error and a non-zero exit;
never a traceback, never a changed input, never a half-written or partial output set."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import blob_volume, centred_affine
from mmdiff.cli import main
from mmdiff.io import is_synthetic
from test_pipelines import tiny_gan, tiny_ldm

MODALITIES = ("t1", "t2", "t1c", "flair", "dwi", "adc")
#: derandomized, so CI runs the same examples every time; --hypothesis-show-statistics shows what each met
SWEEP = settings(deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
#: examples per sweep: malformed volumes and options through the CLI, malformed arrays and calls through the pipelines
CLI_EXAMPLES, PIPELINE_EXAMPLES = 150, 100

# ------------------------------------------------------------------------------ malformed volumes

GOOD_SHAPE = (16, 18, 4)
GOOD_VOLUME = {"shape": GOOD_SHAPE, "dtype": "int16", "content": "blob", "affine": "ras", "file": "ok"}
#: one thing wrong with a volume (None: nothing); the sweep draws one per input
VOLUME_FAULTS = {
    "shape": [(1, 1, 1), (16, 18), (16, 18, 4, 2), (1, 18, 4), (3, 18, 4), (0, 18, 4)],
    "dtype": ["complex64"],
    "content": ["zeros", "constant", "noise", "nan", "inf", "negative", "huge"],
    "affine": ["singular", "nan", "far-away"],
    "file": ["truncated", "garbage", "empty", "txt", "folder", "missing"],
}
#: what varies among good volumes
VOLUME_VARIANTS = {"shape": [GOOD_SHAPE, (16, 18, 4, 1), (16, 18, 1)],
                   "dtype": ["int16", "float32", "float64", "uint8"], "affine": ["ras", "lps", "oblique", "anisotropic"]}
volume_faults = st.one_of(st.none(), st.sampled_from([(k, v) for k, vs in VOLUME_FAULTS.items()
                                                      for v in vs]))


@st.composite
def volumes(draw):
    spec = dict(GOOD_VOLUME, **{k: draw(st.sampled_from(v)) for k, v in VOLUME_VARIANTS.items()})
    fault = draw(volume_faults)
    if fault:
        spec[fault[0]] = fault[1]
    return spec


def _affine(kind: str, shape) -> np.ndarray:
    shape3 = (tuple(shape) + (1, 1, 1))[:3]
    affine = centred_affine(shape3, flip=(-1, -1, 1) if kind == "lps" else (1, 1, 1))
    if kind == "oblique":
        c, s = np.cos(0.3), np.sin(0.3)
        affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ affine[:3, :3]
    elif kind == "anisotropic":
        affine[:3, :3] = affine[:3, :3] @ np.diag([0.5, 0.5, 5.0])
    elif kind == "far-away":
        affine[:3, 3] += 5000.0  # no overlap with an input on a normal grid
    return affine


def write_volume(path: Path, spec: dict) -> Path:
    """Write ``spec`` as a NIfTI (or a broken file) at ``path``; returns the path given to mmdiff."""
    shape = spec["shape"]
    if spec["file"] == "missing":
        return path
    if spec["file"] == "folder":
        path.mkdir()
        return path
    if spec["file"] == "txt":
        path = path.with_suffix(".txt")
        path.write_text("not an image")
        return path
    if spec["file"] == "empty":
        path.write_bytes(b"")
        return path
    if spec["file"] == "garbage":
        path.write_bytes(np.random.default_rng(0).bytes(700))
        return path
    shape3 = (tuple(shape) + (1, 1, 1))[:3]
    if spec["content"] == "blob" and min(shape3) > 0:
        data = np.asarray(blob_volume(shape3, scale=800.0, affine=centred_affine(shape3))[0].dataobj, np.float64)
    else:
        data = np.zeros(shape3)
    data = {"zeros": np.zeros(shape3), "constant": np.full(shape3, 5.0),
            "noise": np.random.default_rng(1).uniform(0, 100, shape3), "negative": -data - 1,
            "huge": data * 1e30}.get(spec["content"], data)
    data = np.stack([data] * shape[3], axis=-1) if len(shape) == 4 else data.reshape(shape)
    if spec["content"] in ("nan", "inf"):
        data = data.copy()
        data.flat[:: max(1, data.size // 7)] = np.nan if spec["content"] == "nan" else np.inf
    dtype = spec["dtype"]
    if dtype in ("int16", "uint8"):
        data = np.nan_to_num(data, nan=0, posinf=0, neginf=0).clip(np.iinfo(dtype).min, np.iinfo(dtype).max)
    elif dtype == "complex64":
        data = data * (1 + 0.5j)
    elif dtype == "float32":
        data = data.clip(-1e38, 1e38)
    affine = _affine(spec["affine"], shape)
    if spec["affine"] in ("singular", "nan"):
        header = nib.Nifti1Header()
        header.set_data_shape(data.shape)
        header.set_data_dtype(dtype)
        header["sform_code"], header["qform_code"] = 1, 0
        header["srow_x"] = [np.nan if spec["affine"] == "nan" else 0.0, 0, 0, 0]
        header["srow_y"], header["srow_z"] = [0, 1, 0, 0], [0, 0, 1, 0]
        image = nib.Nifti1Image(data.astype(dtype), None, header)
    else:
        image = nib.Nifti1Image(data.astype(dtype), affine)
    nib.save(image, path)
    if spec["file"] == "truncated":
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2])
    return path


def is_good(spec: dict) -> bool:
    return (spec["file"] == "ok" and spec["content"] == "blob" and spec["dtype"] != "complex64"
            and spec["shape"] in (GOOD_SHAPE, (16, 18, 4, 1), (16, 18, 1))
            and spec["affine"] in ("ras", "lps", "oblique", "anisotropic"))


# ---------------------------------------------------------------------------------------- options

OPTION_FAULTS = {"samples": [0, -1], "steps": [0, -5, 5000], "batch_size": [0, -2], "seed": [-1, 2**70],
                 "targets": [["t1"], ["t2", "t2"], ["pd"]], "out": ["a-file", "an-input", "proc", "earlier-outputs"],
                 "inputs": [[]]}


@st.composite
def options(draw):
    engine = draw(st.sampled_from(["gan", "gan", "ldm"]))
    opts = {"engine": engine, "samples": draw(st.sampled_from([1, 2])) if engine == "ldm" else 1, "steps": 2,
            "batch_size": draw(st.sampled_from([8, 1, 3])), "seed": draw(st.sampled_from([0, 7])),
            "targets": draw(st.sampled_from([None, None, ["t2"], ["T2W", "adc"]])),
            "out": draw(st.sampled_from(["fresh", "fresh", "earlier-outputs+overwrite", "input-folder+overwrite"])),
            "inputs": draw(st.lists(st.sampled_from(MODALITIES[2:]), min_size=0, max_size=2, unique=True)),
            "input_names": draw(st.sampled_from(["plain", "like-outputs"]))}
    opts["inputs"] = ["t1", *opts["inputs"]]  # t1 given, so the target t2 is always missing
    fault = draw(st.one_of(st.none(), st.sampled_from([(k, v) for k, vs in OPTION_FAULTS.items() for v in vs]
                                                      + [("samples", 2)])))  # --samples 2 with the GAN
    if fault:
        opts[fault[0]] = fault[1]
    return opts


def options_valid(opts: dict) -> bool:
    if opts["samples"] < 1 or opts["batch_size"] < 1 or not 0 <= opts["seed"] < 2**63:
        return False
    if opts["engine"] == "gan" and opts["samples"] != 1:
        return False
    if opts["engine"] == "ldm" and not 1 <= opts["steps"] <= 1000:
        return False
    targets = canonical_targets(opts)
    if opts["targets"] and (len(set(targets)) != len(targets) or "pd" in targets or set(targets) & set(opts["inputs"])):
        return False
    if opts["inputs"] == [] or opts["out"] in ("a-file", "an-input", "proc", "earlier-outputs"):
        return False
    if opts["out"] == "input-folder+overwrite" and opts["input_names"] == "like-outputs":
        named = {MODALITIES[-1 - i] for i in range(len(opts["inputs"]))}
        return not named & set(targets)  # an output would land on an input: refused
    return True


def canonical_targets(opts: dict) -> list[str]:
    if not opts["targets"]:
        return [m for m in MODALITIES if m not in opts["inputs"]]
    return [{"t2w": "t2"}.get(m.lower(), m.lower()) for m in opts["targets"]]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pipeline_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep-pipelines")
    tiny_gan().save_pretrained(root / "gan")
    tiny_ldm().save_pretrained(root / "ldm")
    return root


@settings(SWEEP, max_examples=CLI_EXAMPLES)
@given(opts=options(), specs=st.lists(volumes(), min_size=3, max_size=3))
def test_synthesize_sweep(pipeline_folders, opts, specs):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        exam = tmp / "exam"
        exam.mkdir()
        inputs = {}
        for i, modality in enumerate(opts["inputs"]):
            name = f"{MODALITIES[-1 - i]}_synthetic" if opts["input_names"] == "like-outputs" else modality
            inputs[modality] = write_volume(exam / f"{name}.nii.gz", specs[i])
        out = {"fresh": tmp / "out", "a-file": tmp / "note.txt", "proc": Path("/proc/mmdiff-sweep"),
               "an-input": next(iter(inputs.values()), tmp / "none"), "input-folder+overwrite": exam
               }.get(opts["out"], tmp / "earlier")
        if opts["out"] == "a-file":
            out.write_text("keep")
        if opts["out"].startswith("earlier-outputs"):
            out.mkdir()
            for modality in MODALITIES:
                (out / f"{modality}_synthetic.nii.gz").write_bytes(b"earlier")
        args = ["synthesize", "--out", str(out), "--pipeline", str(pipeline_folders / opts["engine"]),
                "--engine", opts["engine"], "--samples", str(opts["samples"]), "--steps", str(opts["steps"]),
                "--batch-size", str(opts["batch_size"]), "--seed", str(opts["seed"]), "--dataset", "brats"]
        for modality, path in inputs.items():
            args += [f"--{modality}", str(path)]
        if opts["targets"]:
            args += ["--targets", *opts["targets"]]
        if opts["out"].endswith("overwrite"):
            args.append("--overwrite")
        before = digest(tmp)
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = main(args)  # never raises: a bug would surface as an exception here
        err = err.getvalue()
        after = digest(tmp)
        assert "Traceback" not in err, err
        for path in inputs.values():  # inputs untouched
            if path.is_file():
                key = str(path.relative_to(tmp))
                assert after[key] == before[key]
        if code != 0:
            errors = [line for line in err.splitlines() if line.startswith("mmdiff synthesize: error: ")]
            assert len(errors) == 1, err
            event("refused: " + " ".join(re.sub(r"\S*/", "", errors[0].split(": error: ")[1]).split()[:4]))
            assert "unexpected" not in errors[0], errors[0]  # the catch-all only reports bugs
            assert after == before, f"{errors[0]}: files changed"  # nothing new, nothing half-written
            assert not (options_valid(opts) and all(is_good(specs[i]) for i in range(len(inputs)))), errors[0]
            return
        event(f"synthesized ({opts['engine']})")
        # a correct result: every target on the first input's grid, in [0, 1], marked synthetic, with a sidecar
        reference = nib.load(next(iter(inputs.values())))
        made = {p: h for p, h in after.items() if before.get(p) != h}
        targets = canonical_targets(opts)
        expected = {f"{t}_synthetic.{ext}" for t in targets for ext in ("nii.gz", "json")}
        if opts["samples"] > 1:
            expected |= {f"{t}_uncertainty.{ext}" for t in targets for ext in ("nii.gz", "json")}
        assert {Path(p).name for p in made} == expected and all(Path(p).parent == Path(os.path.relpath(out, tmp))
                                                                for p in made)
        for name in expected:
            if name.endswith(".nii.gz"):
                image = nib.load(out / name)
                data = image.get_fdata()
                assert image.shape[:3] == reference.shape[:3] and np.isfinite(data).all()
                assert data.min() >= 0 and (data.max() <= 1 or "uncertainty" in name) and is_synthetic(out / name)
        assert not [p for p in after if Path(p).name.startswith(".")]  # no staging folder left


# ---------------------------------------------------------------------------------------- pipelines

ARRAY_FAULTS = {"shape": [(1,), (20, 18, 3, 2), (0, 5), (3, 3), (20, 17)], "dtype": ["complex64", "bool"],
                "content": ["zeros", "nan", "inf", "constant"]}


@st.composite
def arrays(draw, shape):
    spec = {"shape": shape, "dtype": draw(st.sampled_from(["float32", "int16", "float64"])), "content": "disc",
            "as_tensor": draw(st.booleans())}
    fault = draw(st.one_of(st.none(), st.none(), st.sampled_from([(k, v) for k, vs in ARRAY_FAULTS.items()
                                                                  for v in vs])))
    if fault:
        spec[fault[0]] = fault[1]
    return spec


@st.composite
def pipeline_calls(draw):
    shape = draw(st.sampled_from([(20, 18), (20, 18, 3), (20, 18, 1)]))
    engine = draw(st.sampled_from(["gan", "gan", "ldm"]))
    call = {"specs": [draw(arrays(shape)), draw(arrays(shape))], "engine": engine,
            "batch_size": draw(st.sampled_from([4, 1])),
            "samples": draw(st.sampled_from([1, 2])) if engine == "ldm" else 1,
            "targets": draw(st.sampled_from([None, "t2", ["adc", "T1CE"]])),
            "output_type": draw(st.sampled_from(["np", "pt"]))}
    fault = draw(st.one_of(st.none(), st.sampled_from([("batch_size", 0), ("batch_size", -1), ("samples", 0),
                                                       ("samples", 3), ("targets", ["t1"]), ("targets", ["pd"]),
                                                       ("targets", []), ("output_type", "nifti"),
                                                       ("output_type", "png")])))
    if fault:
        call[fault[0]] = fault[1]
    return call


def make_array(spec: dict):
    import torch

    shape = spec["shape"]
    grid = np.indices(shape).astype(float) if len(shape) else np.zeros((0,))
    if spec["content"] == "disc" and len(shape) >= 2:
        centre = [(n - 1) / 2 for n in shape[:2]]
        disc = ((grid[0] - centre[0]) ** 2 + (grid[1] - centre[1]) ** 2) < (min(shape[:2]) / 3) ** 2
        data = disc * (300 + 50 * np.sin(grid[0]))
    else:
        data = np.full(shape, {"constant": 3.0, "nan": np.nan, "inf": np.inf}.get(spec["content"], 0.0))
    if spec["dtype"] == "int16":
        data = np.nan_to_num(data, nan=0, posinf=0)
    data = data.astype(spec["dtype"]) if spec["dtype"] != "complex64" else (data * (1 + 1j)).astype(np.complex64)
    return torch.from_numpy(np.ascontiguousarray(data)) if spec["as_tensor"] and spec["dtype"] != "bool" else data


@pytest.fixture(scope="module")
def pipes():
    return {"gan": tiny_gan(), "ldm": tiny_ldm()}


@settings(SWEEP, max_examples=PIPELINE_EXAMPLES)
@given(call=pipeline_calls())
def test_pipeline_sweep(pipes, call):
    specs, engine, batch_size, samples = call["specs"], call["engine"], call["batch_size"], call["samples"]
    targets, output_type = call["targets"], call["output_type"]
    pipe = pipes[engine]
    images = {"t1": make_array(specs[0]), "flair": make_array(specs[1])}
    kwargs = {"num_inference_steps": 2} if engine == "ldm" else {}
    try:
        result = pipe(images, dataset="brats", targets=targets, batch_size=batch_size, num_samples=samples,
                      output_type=output_type, **kwargs)
    except ValueError as exc:  # the pipelines' one kind of refusal, with a message
        event("refused: " + " ".join(str(exc).split()[:3])[:40])
        assert str(exc) and "\n" not in str(exc).strip()
        good = all(s["content"] == "disc" and s["dtype"] in ("float32", "int16", "float64")
                   and s["shape"] in ((20, 18), (20, 18, 3), (20, 18, 1)) for s in specs)
        valid = (batch_size >= 1 and samples >= 1 and (engine == "ldm" or samples == 1)
                 and targets in (None, "t2", ["adc", "T1CE"]) and output_type in ("np", "pt")
                 and specs[0]["shape"] == specs[1]["shape"])
        assert not (good and valid), str(exc)
        return
    event(f"synthesized ({engine})")
    for name, image in result.images.items():
        data = np.asarray(image)
        assert data.shape == tuple(specs[0]["shape"]) and np.isfinite(data).all()
        assert data.min() >= 0 and data.max() <= 1, name
