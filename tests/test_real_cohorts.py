"""Cohorts unlike BraTS: a sequence beyond the six (PD), 8-bit volumes stored 4D with a trailing axis of
one, thick slices, their own lesion and brain masks (the white-matter-lesion study), and the real
cohorts in ../shared/data where present."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from conftest import SHARED_DATA, blob_volume, centred_affine
from mmdiff.cli import main
from mmdiff.data.dataset import SliceDataset
from mmdiff.io import load_volume
from mmdiff.pipelines import MMGANPipeline

SEVEN = ["t1", "t2", "t1c", "flair", "dwi", "adc", "pd"]


def write_wml_like(root, cases=3, shape=(40, 44, 10)):
    """uint8 volumes [X, Y, Z, 1] at 1 x 1 x 3 mm with T1, T2, FLAIR, PD, a lesion mask and a brain mask;
    the lesion mask stores its lesion as 255, as the real WML cohort's 8-bit masks do."""
    affine = centred_affine(shape, spacing=(1.0, 1.0, 3.0))
    rows = []
    for i in range(cases):
        case = f"30{i}D0000{i}-2004"
        folder = root / case
        folder.mkdir(parents=True)
        for j, kind in enumerate(("t1", "t2", "flair", "pd", "seg", "brainmask")):
            img, brain, lesion = blob_volume(shape, seed=10 * i + j, scale=120.0 + 30 * j, affine=affine)
            data = {"seg": lesion * 255, "brainmask": brain}.get(kind, np.asarray(img.dataobj))
            volume = nib.Nifti1Image(np.clip(data, 0, 255).astype(np.uint8)[..., None], affine)
            path = folder / f"{case}.{kind}.nii.gz"
            nib.save(volume, path)
            rows.append({"case_id": case, "dataset": "wml", "modality": kind, "path": f"{case}/{path.name}"})
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root / "manifest.csv"


@pytest.fixture(scope="module")
def pd_run(tmp_path_factory):
    """A WML-like cohort with PD plus a glioma phantom, prepared with PD in the modality list, and a
    gan-tiny model trained on it for two steps."""
    root = tmp_path_factory.mktemp("pd")
    manifest = write_wml_like(root / "wml")
    assert main(["phantom", str(root / "ph"), "--cases", "2", "--spacing", "3", "--quiet", "--cohorts", "glioma"]) == 0
    assert main(["prepare", str(manifest), str(root / "ph" / "manifest.csv"), "--out", str(root / "cache"),
                 "--size", "64", "--spacing", "3", "--workers", "1", "--quiet", "--modalities", *SEVEN]) == 0
    assert main(["train", "--config", "gan-tiny", "--output-dir", str(root / "run"), "--max-steps", "2",
                 f"data.cache={root / 'cache'}", f"data.modalities=[{','.join(SEVEN)}]", "validation.every=0",
                 "checkpoint.every=0"]) == 0
    return root


def test_uint8_volumes_with_a_trailing_singleton_axis_are_read_as_3d_floats(tmp_path):
    manifest = write_wml_like(tmp_path, cases=1)
    path = manifest.parent / next(manifest.parent.glob("*/*.t1.nii.gz")).relative_to(manifest.parent)
    assert nib.load(path).shape[-1] == 1 and nib.load(path).get_data_dtype() == np.uint8
    volume = load_volume(path)
    assert volume.shape == (40, 44, 10) and volume.data.dtype == np.float32 and volume.data.max() > 100


def test_prepare_keeps_pd_and_the_cohorts_own_masks(pd_run):
    index = json.loads((pd_run / "cache" / "index.json").read_text())
    assert index["modalities"] == SEVEN
    wml = [c for c in index["cases"] if c["dataset"] == "wml"]
    assert len(wml) == 3 and all(c["modalities"] == ["t1", "t2", "flair", "pd"] and c["has_seg"] for c in wml)
    data = SliceDataset(pd_run / "cache", split=None, datasets=["wml"])
    item = data[len(data) // 2]
    assert item["available"].tolist() == [True, True, False, True, False, False, True]
    pd = item["images"][SEVEN.index("pd")]
    assert pd[item["brain_mask"]].mean() > 0.1 and pd[~item["brain_mask"]].abs().max() == 0
    # the masks' 255 is the lesion label 1, which model.lesion_weight={1: ...} and the lesion tables key on
    labels = set()
    for i in range(len(data)):
        labels |= set(data[i]["seg"].unique().tolist())
    assert labels == {0, 1}


def test_a_model_with_pd_synthesizes_from_uint8_4d_files_and_a_model_without_says_so(pd_run, tmp_path, capsys):
    pipe = MMGANPipeline.from_pretrained(pd_run / "run" / "final")
    assert pipe.modalities == SEVEN and "wml" in pipe.generator.config.dataset_names
    case = next((pd_run / "wml").iterdir())
    files = {kind: str(next(case.glob(f"*.{kind}.nii.gz"))) for kind in ("t1", "t2", "pd")}
    code = main(["synthesize", "--t1", files["t1"], "--t2", files["t2"], "--pd", files["pd"], "--engine", "gan",
                 "--pipeline", str(pd_run / "run" / "final"), "--dataset", "wml", "--targets", "flair",
                 "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    flair = nib.load(tmp_path / "out" / "flair_synthetic.nii.gz")
    source = nib.load(files["t1"])
    assert flair.shape == source.shape[:3]  # the input's grid; the trailing axis of one is dropped
    np.testing.assert_allclose(flair.affine, source.affine)
    sidecar = json.loads((tmp_path / "out" / "flair_synthetic.json").read_text())
    assert set(sidecar["inputs"]) == {"t1", "t2", "pd"}

    from test_pipelines import tiny_gan  # a six-sequence model: it lacks PD

    tiny_gan().save_pretrained(tmp_path / "six")
    code = main(["synthesize", "--t1", files["t1"], "--pd", files["pd"], "--engine", "gan",
                 "--pipeline", str(tmp_path / "six"), "--out", str(tmp_path / "out6")])
    err = capsys.readouterr().err
    assert code != 0 and "not trained on pd" in err and "Traceback" not in err
    assert not (tmp_path / "out6").exists() or not any((tmp_path / "out6").iterdir())


@pytest.mark.real_data
def test_real_wml_and_ms_cohorts_prepare_with_pd_and_their_masks(tmp_path):
    wml, ms = SHARED_DATA / "wml-cbica" / "manifest.csv", SHARED_DATA / "ms-ljubljana" / "manifest.csv"
    if not (wml.exists() and ms.exists()):
        pytest.skip(f"real WML / MS cohorts not present under {SHARED_DATA}")
    rows = list(csv.DictReader(open(wml)))
    first = rows[0]["case_id"]
    subset = tmp_path / "wml.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([{**r, "path": str(wml.parent / r["path"])} for r in rows if r["case_id"] == first])
    assert main(["prepare", f"wml={subset}", f"ms={ms}", "--out", str(tmp_path / "cache"), "--size", "96",
                 "--spacing", "2", "--workers", "1", "--quiet", "--modalities", *SEVEN]) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    by_dataset = {c["dataset"]: c for c in index["cases"]}
    assert by_dataset["wml"]["modalities"] == ["t1", "t2", "flair", "pd"] and by_dataset["wml"]["has_seg"]
    assert by_dataset["ms"]["modalities"] == ["t1", "t2", "t1c", "flair"] and by_dataset["ms"]["has_seg"]
    assert sum(c["dataset"] == "ms" and c["split"] == "test" for c in index["cases"]) == 1  # one of two held out
    data = SliceDataset(tmp_path / "cache", split=None, datasets=["wml"])
    item = data[len(data) // 2]
    inside = item["images"][SEVEN.index("pd")][item["brain_mask"]]
    assert 0.2 < float(inside.median()) < 0.5  # median rule: normal brain near 1/3


def test_evaluation_scores_pd_for_a_model_with_pd_and_leaves_a_model_without_out_of_that_task(pd_run, tmp_path):
    from mmdiff.evaluation.protocol import PipelineMethod, Task
    from mmdiff.evaluation.report import evaluate
    from test_pipelines import tiny_gan

    with_pd = MMGANPipeline.from_pretrained(pd_run / "run" / "final")
    with_pd.set_progress_bar_config(disable=True)
    methods = [PipelineMethod(with_pd, "with-pd"), PipelineMethod(tiny_gan(), "six")]
    rows = evaluate(pd_run / "cache", methods, tmp_path / "eval", split=["train", "val", "test"], datasets=["wml"],
                    tasks=[Task.parse("t1+t2+flair->pd"), Task.parse("t1->t2")], slice_stride=2, figures=False)
    pd_rows = [r for r in rows if r["task"] == "t1+t2+flair->pd"]
    assert pd_rows and {r["method"] for r in pd_rows} == {"with-pd"}
    assert {r["method"] for r in rows if r["task"] == "t1->t2"} == {"with-pd", "six"}
    assert all(np.isfinite(r["psnr_brain"]) for r in rows)
