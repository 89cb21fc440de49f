"""`mmdiff synthesize`: NIfTI in, NIfTI out on the input's grid, marked synthetic, never over inputs."""

import json

import nibabel as nib
import numpy as np
import pytest

from conftest import blob_volume, centred_affine
from mmdiff.cli import main
from mmdiff.io import is_synthetic
from test_pipelines import tiny_gan, tiny_ldm


@pytest.fixture
def exam(tmp_path):
    """T1 and FLAIR of one small exam, stored LPS like BraTS."""
    shape = (30, 34, 6)
    affine = centred_affine(shape, flip=(-1, -1, 1))
    paths = {}
    for name, scale in (("t1", 800.0), ("flair", 500.0)):
        img, _, _ = blob_volume(shape, seed=len(paths), scale=scale, affine=affine)
        paths[name] = tmp_path / f"exam_{name}.nii.gz"
        nib.save(img, paths[name])
    return paths


@pytest.fixture
def pipelines(tmp_path):
    tiny_gan().save_pretrained(tmp_path / "gan")
    tiny_ldm().save_pretrained(tmp_path / "ldm")
    return tmp_path


def test_gan_writes_every_missing_sequence_on_the_input_grid(exam, pipelines, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["synthesize", "--t1", str(exam["t1"]), "--flair", str(exam["flair"]), "--dataset", "brats",
                 "--engine", "gan", "--pipeline", str(pipelines / "gan"), "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    reference = nib.load(exam["t1"])
    for target in ("t2", "t1c", "dwi", "adc"):
        path = out / f"{target}_synthetic.nii.gz"
        image = nib.load(path)
        assert image.shape == reference.shape
        np.testing.assert_allclose(image.affine, reference.affine)
        assert is_synthetic(path)
        data = image.get_fdata()
        assert np.isfinite(data).all() and 0 <= data.min() and data.max() <= 1
        sidecar = json.loads((out / f"{target}_synthetic.json").read_text())
        assert sidecar["synthetic"] is True and sidecar["engine"] == "gan" and sidecar["target"] == target
        assert sidecar["inputs"]["t1"] == str(exam["t1"].resolve()) and sidecar["dataset"] == "brats"
        assert len(sidecar["model_revision"]) == 16
        assert sidecar["precision"] in ("float32", "bfloat16")  # "auto", resolved
    assert not (out / "t1_synthetic.nii.gz").exists()  # given sequences are not synthesized


def test_ldm_samples_give_uncertainty_and_seed_reproduces(exam, pipelines, tmp_path):
    args = ["synthesize", "--t1", str(exam["t1"]), "--flair", str(exam["flair"]), "--targets", "t2",
            "--pipeline", str(pipelines / "ldm"), "--steps", "3", "--samples", "2", "--seed", "7"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    a = nib.load(tmp_path / "a" / "t2_synthetic.nii.gz").get_fdata()
    b = nib.load(tmp_path / "b" / "t2_synthetic.nii.gz").get_fdata()
    np.testing.assert_array_equal(a, b)
    uncertainty = nib.load(tmp_path / "a" / "t2_uncertainty.nii.gz").get_fdata()
    assert uncertainty.shape == a.shape and uncertainty.max() > 0
    sidecar = json.loads((tmp_path / "a" / "t2_uncertainty.json").read_text())
    assert sidecar["samples"] == 2 and sidecar["steps"] == 3 and sidecar["seed"] == 7


def test_refuses_to_overwrite_and_bad_input(exam, pipelines, tmp_path, capsys):
    base = ["synthesize", "--t1", str(exam["t1"]), "--engine", "gan", "--pipeline", str(pipelines / "gan"),
            "--targets", "t2", "--out", str(tmp_path / "out")]
    assert main(base) == 0
    before = (tmp_path / "out" / "t2_synthetic.nii.gz").read_bytes()
    assert main(base) == 2
    assert "exists (pass --overwrite" in capsys.readouterr().err
    assert main(base + ["--overwrite"]) == 0
    assert (tmp_path / "out" / "t2_synthetic.nii.gz").read_bytes() == before  # same model, same output
    # an output that would land on an input
    exam["t1"].rename(tmp_path / "out" / "t1c_synthetic.nii.gz")
    assert main(["synthesize", "--t1", str(tmp_path / "out" / "t1c_synthetic.nii.gz"), "--engine", "gan",
                 "--pipeline", str(pipelines / "gan"), "--targets", "t1c", "--out", str(tmp_path / "out"),
                 "--overwrite"]) == 2
    assert "it is an input file" in capsys.readouterr().err
    assert main(["synthesize", "--out", str(tmp_path / "x"), "--pipeline", str(pipelines / "gan")]) == 2
    assert "no input sequence given" in capsys.readouterr().err
    assert main(["synthesize", "--flair", str(exam["flair"]), "--targets", "flair", "--engine", "gan",
                 "--pipeline", str(pipelines / "gan"), "--out", str(tmp_path / "y")]) == 2
    assert "flair" in capsys.readouterr().err
    assert main(["synthesize", "--flair", str(exam["flair"]), "--out", str(tmp_path / "z"),
                 "--pipeline", str(tmp_path / "nowhere")]) == 2


def test_the_pipeline_says_its_engine_and_the_record_says_what_ran(exam, pipelines, tmp_path, capsys):
    """A GAN folder without --engine runs as the GAN and is recorded so (no diffusion steps); a
    mismatching --engine is an error; the files respect the umask."""
    import os

    previous = os.umask(0o022)
    try:
        assert main(["synthesize", "--t1", str(exam["t1"]), "--targets", "t2", "--pipeline", str(pipelines / "gan"),
                     "--out", str(tmp_path / "out")]) == 0
    finally:
        os.umask(previous)
    sidecar = json.loads((tmp_path / "out" / "t2_synthetic.json").read_text())
    assert sidecar["engine"] == "gan" and sidecar["pipeline"] == "MMGANPipeline"
    assert "steps" not in sidecar and "scheduler" not in sidecar and "samples" not in sidecar
    for file in ("t2_synthetic.nii.gz", "t2_synthetic.json"):
        assert (tmp_path / "out" / file).stat().st_mode & 0o777 == 0o644, file
    assert main(["synthesize", "--t1", str(exam["t1"]), "--targets", "t2", "--pipeline", str(pipelines / "gan"),
                 "--engine", "ldm", "--out", str(tmp_path / "other")]) == 2
    assert "holds an MMGANPipeline (engine gan), not the ldm engine" in capsys.readouterr().err
    assert not (tmp_path / "other").exists()


def test_flip_average_changes_the_gan_image_says_so_and_is_refused_for_the_diffusion_engine(exam, pipelines, tmp_path,
                                                                                             capsys):
    common = ["synthesize", "--t1", str(exam["t1"]), "--targets", "t2", "--pipeline", str(pipelines / "gan")]
    assert main([*common, "--out", str(tmp_path / "once")]) == 0
    assert main([*common, "--flip-average", "--out", str(tmp_path / "twice")]) == 0
    once, twice = (nib.load(tmp_path / run / "t2_synthetic.nii.gz").get_fdata() for run in ("once", "twice"))
    assert once.shape == twice.shape and not np.allclose(once, twice)
    assert json.loads((tmp_path / "twice" / "t2_synthetic.json").read_text())["flip_average"] is True
    assert json.loads((tmp_path / "once" / "t2_synthetic.json").read_text())["flip_average"] is False
    assert main(["synthesize", "--t1", str(exam["t1"]), "--targets", "t2", "--pipeline", str(pipelines / "ldm"),
                 "--flip-average", "--out", str(tmp_path / "from-ldm")]) == 2
    assert "--flip-average is for the GAN engine" in capsys.readouterr().err and not (tmp_path / "from-ldm").exists()


def _hub_cache(root, repo_id: str, folder) -> None:
    """``folder`` as the Hugging Face cache holds a downloaded repo (refs/main -> one snapshot)."""
    import shutil

    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)


def test_hub_repos_load_as_their_own_engine_offline(pipelines, tmp_path):
    from mmdiff.pipelines import MMDiffPipeline, MMGANPipeline, load_pipeline

    cache = tmp_path / "hub-cache"
    _hub_cache(cache, "org/tiny-gan", pipelines / "gan")
    _hub_cache(cache, "org/tiny-ldm", pipelines / "ldm")
    assert type(load_pipeline("org/tiny-gan", cache_dir=cache)) is MMGANPipeline
    assert type(load_pipeline("org/tiny-ldm", cache_dir=cache)) is MMDiffPipeline
    with pytest.raises(ValueError, match="holds an MMDiffPipeline \\(engine ldm\\), not the gan engine"):
        load_pipeline("org/tiny-ldm", engine="gan", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE is set and it is not in the local Hub cache"):
        load_pipeline("org/not-downloaded", cache_dir=cache)


def test_a_cohort_loads_the_model_once_and_one_bad_case_loses_no_other(exam, pipelines, tmp_path, capsys,
                                                                       monkeypatch):
    """`--cases manifest.csv`: each case to OUT/<case_id>/ with its own inputs and brain mask; a broken
    case is recorded as failed (exit 1) and the others are written; a second run skips what exists;
    --targets leaves a case's own file of a target out of its inputs; the model is loaded once."""
    import mmdiff.pipelines as pipelines_module
    from mmdiff.data.manifest import Case, write_manifest

    shape = nib.load(exam["t1"]).shape
    mask = tmp_path / "mask.nii.gz"
    inside = np.zeros(shape, dtype=np.uint8)
    inside[5:25, 5:29, :] = 1
    nib.save(nib.Nifti1Image(inside, nib.load(exam["t1"]).affine), mask)
    broken = tmp_path / "broken_t1.nii.gz"
    broken.write_bytes(b"not a nifti")
    cases = [Case("sub-01", "brats", {"t1": exam["t1"], "flair": exam["flair"]}),
             Case("sub/02", "somewhere", {"t1": exam["t1"], "brainmask": mask}),
             Case("sub-03", "brats", {"t1": broken})]
    manifest = write_manifest(cases, tmp_path / "cohort.csv")
    loads = []
    real_load = pipelines_module.load_pipeline
    monkeypatch.setattr(pipelines_module, "load_pipeline", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    out = tmp_path / "out"
    args = ["synthesize", "--cases", str(manifest), "--engine", "gan", "--pipeline", str(pipelines / "gan"),
            "--out", str(out)]
    assert main(args) == 1  # one case failed
    captured = capsys.readouterr()
    assert "sub-03" in captured.err and "2 done, 0 skipped, 1 failed" in captured.out
    assert len(loads) == 1
    record = json.loads((out / "cases.json").read_text())
    status = {e["case_id"]: e["status"] for e in record["cases"]}
    assert status == {"sub-01": "done", "sub/02": "done", "sub-03": "failed"}
    # each case its own missing sequences, in its own folder (a case id made safe for a folder name)
    assert sorted(p.name for p in (out / "sub-01").glob("*.nii.gz")) == [
        f"{t}_synthetic.nii.gz" for t in sorted(("t2", "t1c", "dwi", "adc"))]
    assert (out / "sub_02" / "flair_synthetic.nii.gz").exists() and not (out / "sub-03").exists()
    second = json.loads((out / "sub_02" / "t2_synthetic.json").read_text())
    assert second["brain_mask"] == str(mask.resolve()) and second["dataset"] == "somewhere"
    # outside the given mask the synthetic image is background
    synthetic = nib.load(out / "sub_02" / "t2_synthetic.nii.gz").get_fdata()
    assert synthetic[inside == 0].max() == 0 and synthetic[inside == 1].max() > 0
    before = (out / "sub-01" / "t2_synthetic.nii.gz").read_bytes()
    # again: the cases done are skipped, not redone; the broken one fails again
    assert main(args) == 1
    record = json.loads((out / "cases.json").read_text())
    assert [e["status"] for e in record["cases"]] == ["skipped", "skipped", "failed"]
    assert (out / "sub-01" / "t2_synthetic.nii.gz").read_bytes() == before
    # --targets: a case's own FLAIR is not an input when FLAIR is a target
    assert main(["synthesize", "--cases", str(manifest), "--engine", "gan", "--pipeline", str(pipelines / "gan"),
                 "--targets", "flair", "--out", str(tmp_path / "hidden")]) == 1
    sidecar = json.loads((tmp_path / "hidden" / "sub-01" / "flair_synthetic.json").read_text())
    assert sorted(sidecar["inputs"]) == ["t1"]
    # files and --cases together, and an empty cohort, are refused before anything loads
    assert main(args + ["--t1", str(exam["t1"])]) == 2
    assert "--cases reads each case's files" in capsys.readouterr().err
    empty = write_manifest([], tmp_path / "empty.csv")
    assert main(["synthesize", "--cases", str(empty), "--engine", "gan", "--pipeline", str(pipelines / "gan"),
                 "--out", str(tmp_path / "none")]) == 2
    assert "no cases found" in capsys.readouterr().err


def test_case_folder_names_are_safe_and_never_shared():
    from mmdiff.data.manifest import Case
    from mmdiff.synthesize import case_folder_names

    names = case_folder_names([Case("sub-01", "a"), Case("../etc", "a"), Case("sub 02/ses-1", "b")])
    assert list(names.values()) == ["sub-01", "etc", "sub_02_ses-1"]
    with pytest.raises(ValueError, match="would share the output folder 'sub_1'"):
        case_folder_names([Case("sub 1", "a"), Case("sub/1", "a")])


def test_revision_hashes_a_folder_once_per_state(tmp_path, monkeypatch):
    """A cohort asks for the model's revision every case: the weights are read once, and read again
    (a new hash) only when a file changes."""
    import os
    from pathlib import Path

    from mmdiff.synthesize import revision

    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    (folder / "unet" / "w.safetensors").write_bytes(b"weights")
    reads = []
    real = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: reads.append(self.name) or real(self))
    first = revision(folder)
    assert revision(folder) == first and len(reads) == 2
    (folder / "unet" / "w.safetensors").write_bytes(b"other weights")
    os.utime(folder / "unet" / "w.safetensors", ns=(1, 1))
    assert revision(folder) != first and len(first) == 16 and len(reads) == 4
    assert revision("org/repo") == "org/repo"
