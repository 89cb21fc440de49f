"""Hardening (issue 14): bad input and faults get one-line errors, nothing half-written, inputs untouched,
only the pipeline published. Every test here fails without the fix it names."""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmdiff.synthesize
from conftest import blob_volume, centred_affine, write_layout
from mmdiff.cli import main
from mmdiff.data.layouts import scan
from mmdiff.data.manifest import Case
from mmdiff.data.prepare import PrepareConfig, prepare
from mmdiff.pipelines import MMGANPipeline
from mmdiff.train import main as train_main
from test_export import fake_run, hub  # noqa: F401 (hub: the stand-in hub fixture)
from test_pipelines import tiny_gan

HERE = Path(__file__).parent


# ------------------------------------------------------------------------------------------ helpers

def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_exam(folder: Path, shape=(30, 34, 6)) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    affine = centred_affine(shape, flip=(-1, -1, 1))
    paths = {}
    for i, (name, scale) in enumerate((("t1", 800.0), ("flair", 500.0))):
        img, _, _ = blob_volume(shape, seed=i, scale=scale, affine=affine)
        paths[name] = folder / f"exam_{name}.nii.gz"
        nib.save(img, paths[name])
    return paths


def broken_header(path: Path, srow_x, shape=(12, 12, 4), dtype=np.float32) -> Path:
    """A NIfTI whose sform row x is ``srow_x`` (NaN or zero: an affine nibabel itself would not write)."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["sform_code"], header["qform_code"] = 1, 0
    header["srow_x"], header["srow_y"], header["srow_z"] = srow_x, [0, 1, 0, 0], [0, 0, 1, 0]
    nib.save(nib.Nifti1Image(np.ones(shape, dtype), None, header), path)
    return path


def huge_declared_shape(path: Path) -> Path:
    """An uncompressed NIfTI whose header claims 30000^3 voxels (the data is 12^3)."""
    nib.save(nib.Nifti1Image(np.ones((12, 12, 12), np.float32), np.eye(4)), path)
    header = nib.load(path).header.copy()
    header.set_data_shape((30000, 30000, 30000))
    with open(path, "r+b") as f:
        f.write(header.binaryblock)
    return path


class Trap:
    """Unpickling this creates ``marker``: proof that a pickle ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def gan_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pipelines") / "gan"
    tiny_gan().save_pretrained(folder)
    return folder


@pytest.fixture
def exam(tmp_path) -> dict[str, Path]:
    return write_exam(tmp_path / "exam")


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if synthesize gets as far as loading a model."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad option was refused")
    import mmdiff.pipelines

    monkeypatch.setattr(mmdiff.pipelines, "load_pipeline", refuse)  # what synthesize calls
    monkeypatch.setattr(mmdiff.pipelines.loading, "load_pipeline", refuse)


def run_cli(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    return code, err


def error_line(err: str) -> str:
    """The CLI's error: exactly one line, no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("mmdiff")]
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, err
    return errors[0]


# --------------------------------------------------------------------- synthesize: options first

@pytest.mark.parametrize("extra, says", [
    (["--engine", "gan", "--samples", "2"], "--samples 2 needs the diffusion engine"),
    (["--samples", "0"], "--samples must be at least 1, got 0"),
    (["--samples", "-1"], "--samples must be at least 1, got -1"),
    (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    (["--steps", "0"], "--steps must be between 1 and 1000"),
    (["--seed", "-3"], "--seed must be between 0 and"),
    (["--engine", "gan", "--scheduler", "ddim"], "--scheduler is for the diffusion engine"),
    (["--targets", "t1"], "t1 is an input"),
    (["--targets", "t2", "T2W"], "--targets names t2 twice"),
    (["--targets", "pd_weighted"], "pd_weighted"),
])
def test_bad_options_are_refused_before_any_model_loads(extra, says, exam, tmp_path, no_model_load, capsys):
    out = tmp_path / "out"
    code, err = run_cli(["synthesize", "--t1", exam["t1"], "--out", out, *extra], capsys)
    assert code == 2 and says in error_line(err)
    assert not out.exists()


def test_gan_folder_with_samples_is_refused_whatever_the_engine_flag(exam, gan_folder, tmp_path, no_model_load, capsys):
    # the probe's case: 10 files written, then a TypeError; the folder says it is a GAN
    code, err = run_cli(["synthesize", "--t1", exam["t1"], "--pipeline", gan_folder, "--samples", "2",
                         "--out", tmp_path / "out"], capsys)
    assert code == 2 and "--samples 2 needs the diffusion engine" in error_line(err)
    assert not (tmp_path / "out").exists()


def test_bad_output_folders_are_refused_before_any_model_loads(exam, tmp_path, no_model_load, capsys):
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    cases = [(a_file, "is a file, not a folder"), (exam["flair"], "is one of the input files"),
             (Path("/proc/mmdiff-out"), "is under /proc"), (a_file / "sub", "is a file, so no folder can be made")]
    for out, says in cases:
        code, err = run_cli(["synthesize", "--t1", exam["t1"], "--flair", exam["flair"], "--out", out], capsys)
        assert code == 2 and says in error_line(err), out
    assert a_file.read_text() == "keep me"


@contextlib.contextmanager
def unprivileged():
    """Run as an ordinary user: root writes into read-only folders, nobody does not."""
    if os.geteuid() != 0:
        yield
        return
    os.setegid(65534)
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


@pytest.fixture
def open_folder():
    """A folder an unprivileged user can read (pytest's tmp folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="mmdiff-hardening-"))
    folder.chmod(0o755)
    yield folder
    for path in [folder, *folder.rglob("*")]:
        if path.is_dir():
            path.chmod(0o755)
    shutil.rmtree(folder, ignore_errors=True)


def test_read_only_output_folder_is_refused_before_any_model_loads(open_folder, no_model_load, capsys):
    exam = write_exam(open_folder / "exam")
    (open_folder / "exam").chmod(0o755)
    out = open_folder / "out"
    out.mkdir()
    out.chmod(0o555)
    with unprivileged():
        code, err = run_cli(["synthesize", "--t1", exam["t1"], "--out", out], capsys)
    assert code == 2 and "cannot write in" in error_line(err)
    assert list(out.iterdir()) == []


def test_output_folder_made_read_only_during_synthesis_leaves_nothing(open_folder, gan_folder, monkeypatch, capsys):
    pipeline = open_folder / "gan"
    shutil.copytree(gan_folder, pipeline)
    for path in [pipeline, *pipeline.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    exam = write_exam(open_folder / "exam")
    (open_folder / "exam").chmod(0o755)
    out = open_folder / "out"
    out.mkdir()
    (out / "t2_synthetic.nii.gz").write_bytes(b"an earlier output")
    out.chmod(0o777)
    real_call = MMGANPipeline.__call__

    def call_then_lock(self, *args, **kwargs):
        result = real_call(self, *args, **kwargs)
        out.chmod(0o555)  # the folder turns read-only after inference, before the writes
        return result

    monkeypatch.setattr(MMGANPipeline, "__call__", call_then_lock)
    with unprivileged():
        code, err = run_cli(["synthesize", "--t1", exam["t1"], "--pipeline", pipeline, "--out", out,
                             "--overwrite"], capsys)
    assert code == 1 and "permission denied" in error_line(err)
    assert snapshot(out) == {"t2_synthetic.nii.gz": b"an earlier output"}


def test_full_disk_during_writes_leaves_no_partial_output_set(exam, gan_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["synthesize", "--t1", exam["t1"], "--flair", exam["flair"], "--pipeline", gan_folder, "--out", out]
    assert run_cli(args, capsys)[0] == 0
    before = snapshot(out)
    assert len(before) == 8  # four targets, each image + sidecar
    real_save, calls = mmdiff.synthesize.save_nifti, []

    def save_until_full(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(a[2]))
        return real_save(*a, **k)

    monkeypatch.setattr(mmdiff.synthesize, "save_nifti", save_until_full)
    code, err = run_cli(args + ["--overwrite", "--dataset", "ixi"], capsys)
    assert code == 1 and "no space left on the device" in error_line(err)
    assert snapshot(out) == before  # earlier outputs intact, nothing new, no staging folder left
    calls.clear()
    code, err = run_cli(args[:-1] + [tmp_path / "new" / "out"], capsys)
    assert code == 1 and not (tmp_path / "new").exists()  # the folders made for it are gone too


def test_staging_folders_of_killed_runs_are_removed(exam, gan_folder, tmp_path, capsys):
    out = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    killed = out / f"{mmdiff.synthesize.STAGING_PREFIX}{dead.pid}-abc123"  # what kill -9 mid-write leaves
    live = out / f"{mmdiff.synthesize.STAGING_PREFIX}{os.getpid()}-def456"  # another run, still going
    for folder in (killed, live):
        folder.mkdir(parents=True)
        (folder / "t2_synthetic.nii.gz").write_bytes(b"half")
    code, err = run_cli(["synthesize", "--t1", exam["t1"], "--pipeline", gan_folder, "--targets", "t2",
                         "--out", out], capsys)
    assert code == 0, err
    assert not killed.exists() and live.exists()
    assert sorted(p.name for p in out.iterdir() if p != live) == ["t2_synthetic.json", "t2_synthetic.nii.gz"]


def test_a_failed_rename_puts_every_earlier_output_back(exam, gan_folder, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    args = ["synthesize", "--t1", exam["t1"], "--flair", exam["flair"], "--pipeline", gan_folder, "--out", out]
    assert run_cli(args, capsys)[0] == 0
    before = snapshot(out)
    real_replace, calls = os.replace, []

    def replace_then_fail(src, dst):
        if Path(dst).parent == out:  # a move into place (not a write in the staging folder)
            calls.append(dst)
            if len(calls) == 3:  # two new files are in place, the third fails
                raise OSError(errno.EIO, "Input/output error", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(mmdiff.synthesize.os, "replace", replace_then_fail)
    code, err = run_cli(args + ["--overwrite", "--dataset", "ixi"], capsys)
    monkeypatch.undo()
    assert code == 1 and "Input/output error" in error_line(err)
    assert snapshot(out) == before


# ---------------------------------------------------------------------- synthesize: bad volumes

def test_bad_volumes_get_messages_naming_the_file(exam, tmp_path, no_model_load, capsys):
    complex_path = tmp_path / "complex.nii.gz"
    nib.save(nib.Nifti1Image((np.ones((12, 12, 4)) * (1 + 2j)).astype(np.complex64), np.eye(4)), complex_path)
    tiny = tmp_path / "voxel.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((1, 1, 1), np.float32), np.eye(4)), tiny)
    cases = [(complex_path, "complex-valued voxels"),
             (broken_header(tmp_path / "nan.nii.gz", [np.nan, 0, 0, 0]), "affine (voxel-to-world matrix) is not finite"
              ),
             (broken_header(tmp_path / "singular.nii.gz", [0, 0, 0, 0]), "affine (voxel-to-world matrix) is singular"),
             (tiny, "axial slices of 1 x 1 voxels"),
             (huge_declared_shape(tmp_path / "huge.nii"), "declares shape (30000, 30000, 30000)")]
    for path, says in cases:
        code, err = run_cli(["synthesize", "--t1", exam["t1"], "--flair", path, "--out", tmp_path / "out"], capsys)
        line = error_line(err)
        assert code == 2 and says in line and str(path) in line, line
    assert not (tmp_path / "out").exists()


def test_constant_volume_and_one_file_for_two_sequences_warn(exam, gan_folder, tmp_path, capsys):
    constant = tmp_path / "constant.nii.gz"
    nib.save(nib.Nifti1Image(np.full((30, 34, 6), 7.0, np.float32), nib.load(exam["t1"]).affine), constant)
    code, err = run_cli(["synthesize", "--t1", exam["t1"], "--flair", constant, "--pipeline", gan_folder,
                         "--targets", "t2", "--out", tmp_path / "a"], capsys)
    assert code == 0 and "warning: flair" in err and "is constant (every voxel is 7)" in err
    code, err = run_cli(["synthesize", "--t1", exam["t1"], "--flair", exam["t1"], "--pipeline", gan_folder,
                         "--targets", "t2", "--out", tmp_path / "b"], capsys)
    assert code == 0 and "t1 and flair are the same image" in err
    assert "Traceback" not in err and "warnings.warn" not in err  # one line per warning


# --------------------------------------------------------------------- synthesize: bad pipelines

def _broken_pipelines(root: Path, good: Path, marker: Path) -> list[tuple[Path, str]]:
    cases = []

    def copy(name):
        shutil.copytree(good, root / name)
        return root / name

    weights = "generator/diffusion_pytorch_model.safetensors"
    p = copy("pickle")
    (p / weights).unlink()
    with open(p / "generator" / "diffusion_pytorch_model.bin", "wb") as f:
        pickle.dump({"weights": Trap(marker)}, f)
    cases.append((p, "are pickle files, which mmdiff never loads"))
    p = copy("truncated")
    data = (p / weights).read_bytes()
    (p / weights).write_bytes(data[: len(data) // 2])
    cases.append((p, "diffusion_pytorch_model.safetensors is corrupt or truncated"))
    p = copy("garbage")
    (p / weights).write_bytes(os.urandom(4096))
    cases.append((p, "diffusion_pytorch_model.safetensors is corrupt or truncated"))
    p = copy("bad-json")
    (p / "model_index.json").write_text('{"_class_name": ')
    cases.append((p, "model_index.json is not valid JSON"))
    p = copy("list-index")
    (p / "model_index.json").write_text("[1, 2]")
    cases.append((p, "mmdiff loads MMDiffPipeline or MMGANPipeline only"))
    p = copy("foreign-module")
    (p / "model_index.json").write_text(json.dumps({"_class_name": "MMGANPipeline", "generator": ["os", "system"]}))
    cases.append((p, "comes from 'os'; mmdiff loads only diffusers and mmdiff classes"))
    p = copy("bad-config")
    (p / "generator" / "config.json").write_text("{")
    cases.append((p, "generator/config.json is not valid JSON"))
    p = copy("no-component")
    shutil.rmtree(p / "generator")
    cases.append((p, "component generator is missing"))
    return cases


def test_broken_pipelines_get_one_line_errors_before_loading(exam, gan_folder, tmp_path, no_model_load, capsys):
    marker = tmp_path / "pickle-ran"
    for folder, says in _broken_pipelines(tmp_path / "broken", gan_folder, marker):
        code, err = run_cli(["synthesize", "--t1", exam["t1"], "--pipeline", folder, "--out", tmp_path / "out"],
                            capsys)
        line = error_line(err)
        assert code == 2 and says in line and str(folder) in line, line
    code, err = run_cli(["synthesize", "--t1", exam["t1"], "--pipeline", "nobody/no-such-model",
                         "--out", tmp_path / "out"], capsys)
    assert code == 2 and "is not in the local cache while HF_HUB_OFFLINE is set" in error_line(err)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_pipeline_api_refuses_complex_arrays_and_a_zero_batch():
    pipe = tiny_gan()
    image = np.zeros((16, 16), np.float32)
    image[4:12, 4:12] = 1
    with pytest.raises(ValueError, match="complex values"):
        pipe({"t1": image.astype(np.complex64)})
    with pytest.raises(ValueError, match="batch_size must be a whole number of at least 1"):
        pipe({"t1": image}, batch_size=0)


# ------------------------------------------------------------------------------------- prepare

def test_prepare_refuses_two_cases_that_share_a_folder(tmp_path, capsys):
    write_layout(tmp_path / "src", "brats2018", n_cases=2)
    found = scan(tmp_path / "src")
    first = Case("site/a", "gli", dict(found[0].files))
    second = Case("site_a", "gli", dict(found[1].files))
    with pytest.raises(ValueError, match="would share the cache folder"):
        prepare([first, second], tmp_path / "cache", PrepareConfig(size=32, spacing=2.0), progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any work
    # through the CLI, from a manifest
    manifest = tmp_path / "cases.csv"
    manifest.write_text("case_id,dataset,modality,path\n" + "".join(
        f"{case.case_id},gli,{kind},{path}\n" for case in (first, second) for kind, path in case.files.items()))
    code, err = run_cli(["prepare", manifest, "--out", tmp_path / "cli-cache", "--size", "32", "--spacing", "2",
                         "--quiet"], capsys)
    assert code == 2 and "'site/a' and gli/'site_a' would share the cache folder" in error_line(err)
    # a cache that holds one of them refuses the other (it would be reported as already cached)
    summary = prepare([first], tmp_path / "cache", PrepareConfig(size=32, spacing=2.0), progress=False)
    assert summary["prepared"] == 1
    with pytest.raises(ValueError, match="which holds gli/'site/a'"):
        prepare([second], tmp_path / "cache", PrepareConfig(size=32, spacing=2.0), progress=False)


def test_interrupted_prepare_resumes_to_the_same_cache(tmp_path, monkeypatch):
    prep = importlib.import_module("mmdiff.data.prepare")  # the package exports a function of that name

    write_layout(tmp_path / "src", "brats2018", n_cases=3)
    cases = scan(tmp_path / "src")
    config = PrepareConfig(size=32, spacing=2.0)
    clean = prepare(cases, tmp_path / "clean", config, progress=False)
    real_save, calls = np.save, []

    def save_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:  # the second case, half-written
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(prep.np, "save", save_then_interrupt)
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        prepare(cases, cache, config, progress=False)
    monkeypatch.undo()
    # a kill -9 instead leaves the temporary folder of the case being written, meta.json and all
    done = next(cache.glob("cases/*/*/meta.json"))
    stale = done.parent.parent / f".{cases[1].case_id}.x1y2z3"
    stale.mkdir()
    (stale / "meta.json").write_text(done.read_text())
    summary = prepare(cases, cache, config, progress=False)
    assert summary["prepared"] == 2 and summary["cached"] == 1 and not summary["skipped"]
    assert summary["cases_in_cache"] == clean["cases_in_cache"] == 3
    assert not [p for p in cache.rglob(".*")]  # no temporary folder left, none indexed
    assert json.loads((cache / "index.json").read_text()) == json.loads((tmp_path / "clean" / "index.json").read_text())
    for entry in json.loads((cache / "index.json").read_text())["cases"]:
        for name in ("images.npy", "brain_mask.npy", "seg.npy"):
            np.testing.assert_array_equal(np.load(tmp_path / "clean" / entry["path"] / name),
                                          np.load(cache / entry["path"] / name))


# ---------------------------------------------------------------------------------------- train

def _train(out, cache, *args):
    return train_main(["--config", "gan-tiny", "--output-dir", str(out), f"data.cache={cache}", "tracker=none",
                       "checkpoint.every=2", "checkpoint.keep=null", "validation.every=2", "train.log_every=1",
                       *map(str, args)])


def _records(run: Path) -> list[tuple[int, str]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], "val" if any(k.startswith("val/") for k in r) else "train") for r in records]


KILLED_SAVE = """
import sys, time
from pathlib import Path
import mmdiff.training.checkpoint as checkpoint
real_save = checkpoint.torch.save
def save(obj, path, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("step") == 4:  # the checkpoint at step 4: weights written, state not
        Path(sys.argv[1]).write_text("writing")
        time.sleep(600)
    return real_save(obj, path, *args, **kwargs)
checkpoint.torch.save = save
from mmdiff.train import main
main(sys.argv[2:])
"""


def test_kill_during_a_checkpoint_write_then_resume(tiny_cache, tmp_path, caplog):
    run, marker = tmp_path / "run", tmp_path / "writing"
    args = ["--config", "gan-tiny", "--output-dir", str(run), f"data.cache={tiny_cache}", "tracker=none",
            "checkpoint.every=2", "checkpoint.keep=null", "validation.every=0", "train.log_every=1", "--max-steps", "4"]
    process = subprocess.Popen([sys.executable, "-c", KILLED_SAVE, str(marker), *args], cwd=HERE.parent,
                               env={**os.environ, "OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marker.exists(), "the run never reached its checkpoint at step 4"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert [p.name for p in run.glob(".checkpoint-4.*")]  # what kill -9 leaves behind
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    with caplog.at_level("INFO", logger="mmdiff.training.trainer"):
        assert _train(run, tiny_cache, "--max-steps", "4", "--resume", "latest", "validation.every=0") == 0
    assert "resumed from" in caplog.text and "checkpoint-2 at step 2" in caplog.text
    assert not list(run.glob(".checkpoint-*"))  # the half-written folder is gone
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    records = _records(run)
    assert len(records) == len(set(records))  # steps 3 and 4 were re-done, and logged once
    assert {s for s, kind in records if kind == "train"} == {1, 2, 3, 4}
    # killed before its first checkpoint: the run starts over, and so does its record
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 7, "train/lo')  # cut line
    for checkpoint in run.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    assert _train(run, tiny_cache, "--max-steps", "1", "--resume", "latest", "validation.every=0") == 0
    assert _records(run) == [(1, "train"), (1, "val")]  # the old records are gone, the cut line too


def test_corrupt_newest_checkpoint_falls_back_and_untrusted_state_is_refused(tiny_cache, tmp_path, caplog, capsys):
    run = tmp_path / "run"
    assert _train(run, tiny_cache, "--max-steps", "4") == 0
    newest = run / "checkpoint-4" / "generator.safetensors"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    with caplog.at_level("WARNING", logger="mmdiff.training.trainer"):
        assert _train(run, tiny_cache, "--max-steps", "6", "--resume", "latest") == 0
    assert "cannot resume from checkpoint-4" in caplog.text and "falling back to checkpoint-2" in caplog.text
    assert (run / "checkpoint-6" / "checkpoint.json").exists()
    records = _records(run)
    assert len(records) == len(set(records))
    capsys.readouterr()
    # a truncated state.pt, and one that is a pickle that would run code: refused, nothing unpickled
    marker = tmp_path / "pickle-ran"
    state = run / "checkpoint-6" / "state.pt"
    good = state.read_bytes()
    for broken in (good[: len(good) // 3], pickle.dumps({"step": 6, "rng": Trap(marker)})):
        state.write_bytes(broken)
        assert _train(run, tiny_cache, "--max-steps", "8", "--resume", str(run / "checkpoint-6")) == 2
        line = error_line(capsys.readouterr().err)
        assert "state.pt is corrupt, truncated or untrusted" in line and "never unpickles" in line
        assert "weights_only=False" not in line and "--resume PATH" in line
    assert not marker.exists()
    # every checkpoint unreadable: say so, do not start over silently
    for name in ("checkpoint-2", "checkpoint-4"):
        (run / name / "state.pt").write_bytes(b"not a zip")
    assert _train(run, tiny_cache, "--max-steps", "8", "--resume", "latest") == 2
    assert "No earlier complete checkpoint is left" in error_line(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------- push

def _export(tmp_path: Path) -> Path:
    out = tmp_path / "mmdiff-gan"
    assert main(["export", str(fake_run(tmp_path / "run", tiny_gan())), str(out)]) == 0
    return out


PIPELINE_FILES = {"model_index.json", "README.md", "training_info.json", "generator/config.json",
                  "generator/diffusion_pytorch_model.safetensors"}


def test_push_publishes_only_the_pipeline(hub, tmp_path):  # noqa: F811 (the fixture)
    endpoint, root = hub
    out = _export(tmp_path)
    (out / "credentials.json").write_text('{"token": "hf_secret"}')
    (out / ".env").write_text("HF_TOKEN=hf_secret")
    (out / "notes.md").write_text("private notes")
    (out / "generator" / "old.bin").write_bytes(b"pickle")
    (out / "cache").mkdir()
    (out / "cache" / "big.safetensors").write_bytes(b"x")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": endpoint,
                                                                            "HF_TOKEN": "hf_stand_in"}
    done = subprocess.run([sys.executable, "-m", "mmdiff.cli", "push", str(out), "--repo-id", "org/mmdiff-gan"],
                          env=env, capture_output=True, text=True, timeout=120, cwd=HERE.parent)
    assert done.returncode == 0, done.stderr
    uploaded = root / "org" / "mmdiff-gan"
    published = {str(p.relative_to(uploaded)) for p in uploaded.rglob("*") if p.is_file()} - {".commit_message"}
    assert published == PIPELINE_FILES
    for name in published:
        assert (uploaded / name).read_bytes() == (out / name).read_bytes()
    listing = done.stdout[: done.stdout.index("pushed")]  # shown before the upload
    assert all(name in listing for name in PIPELINE_FILES)
    assert ("left out (not part of the pipeline): .env, cache/big.safetensors, credentials.json, generator/old.bin, "
            "notes.md") in listing


def test_push_dry_run_lists_and_uploads_nothing(tmp_path, capsys):
    out = _export(tmp_path)
    (out / "credentials.json").write_text("{}")
    code = main(["push", str(out), "--repo-id", "org/x", "--dry-run"])  # offline: any upload would fail
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "would upload to org/x: 5 file(s)" in captured.out and "dry run: nothing uploaded" in captured.out
    assert "left out (not part of the pipeline): credentials.json" in captured.out


@pytest.mark.parametrize("link", ["generator/config.json", "training_info.json", "extra.txt", "generator"])
def test_push_refuses_symlinks(link, tmp_path, capsys):
    out = _export(tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("system file contents")
    target = out / link
    if target.is_dir():
        shutil.move(target, tmp_path / "moved")
        target.symlink_to(tmp_path / "moved", target_is_directory=True)
    else:
        target.unlink(missing_ok=True)
        target.symlink_to(secret)
    code, err = run_cli(["push", out, "--repo-id", "org/x", "--dry-run"], capsys)
    assert code == 2 and f"{target} is a symbolic link" in error_line(err)


def test_push_refuses_pickle_weights(tmp_path, capsys):
    out = _export(tmp_path)
    weights = out / "generator" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), out / "generator" / "diffusion_pytorch_model.bin")
    weights.unlink()
    code, err = run_cli(["push", out, "--repo-id", "org/x", "--dry-run"], capsys)
    assert code == 2 and "are pickle files" in error_line(err)
