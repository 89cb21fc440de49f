import json

import numpy as np
import pytest
import torch

from conftest import write_layout
from mmdiff.cli import main
from mmdiff.data.dataset import CacheError, SliceDataset
from mmdiff.data.layouts import scan
from mmdiff.data.prepare import PrepareConfig, assign_splits, crop_or_pad, prepare
from mmdiff.io import VolumeError

TINY = PrepareConfig(size=32, spacing=2.0)


@pytest.fixture
def sources(tmp_path):
    write_layout(tmp_path / "gli", "brats2018", n_cases=3)
    write_layout(tmp_path / "isles", "bids", n_cases=2)
    return scan(tmp_path / "gli") + scan(tmp_path / "isles")


def test_prepare_writes_a_cache_that_iterates(tmp_path, sources):
    summary = prepare(sources, tmp_path / "cache", TINY, progress=False)
    assert summary["prepared"] == 5 and not summary["skipped"]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["datasets"] == ["gli", "isles"]
    ds = SliceDataset(tmp_path / "cache", split=None)
    assert len(ds) == summary["slices_in_cache"] > 0
    item = ds[0]
    assert item["images"].shape == (6, 32, 32) and item["images"].dtype == torch.float32
    assert 0 <= item["images"].min() and item["images"].max() <= 1
    assert item["brain_mask"].dtype == torch.bool
    # missing modalities are zero, present ones carry signal in the brain
    for i in range(len(ds)):
        s = ds[i]
        assert not s["images"][~s["available"]].any()
        assert not s["images"][:, ~s["brain_mask"]].any()  # background is 0
    groups = set(ds.groups)
    assert groups == {(0, "111100"), (1, "000111")}


def test_isles_flair_is_resampled_into_dwi_space(tmp_path, sources):
    prepare(sources[3:4], tmp_path / "cache", PrepareConfig(size=32, spacing=2.0), progress=False)
    (case_dir,) = (tmp_path / "cache" / "cases" / "isles").iterdir()
    meta = json.loads((case_dir / "meta.json").read_text())
    assert meta["modalities"] == ["flair", "dwi", "adc"]
    assert meta["notes"] == ["flair is on another grid than seg: resampled by the affines"]
    np.testing.assert_allclose(np.diag(meta["grid_affine"])[:3], [2, 2, 2])
    images = np.load(case_dir / "images.npy")
    flair, dwi = images[:, 0] > 0.1, images[:, 1] > 0.1
    # the same world-space blob, acquired on two grids, lines up after resampling by the affines
    dice = 2 * (flair & dwi).sum() / (flair.sum() + dwi.sum())
    assert dice > 0.9


def test_rerun_skips_finished_cases_and_bad_files_are_reported(tmp_path, sources):
    prepare(sources[:2], tmp_path / "cache", TINY, progress=False)
    bad = sources[2]
    bad.files["t2"].write_bytes(b"corrupt")
    summary = prepare(sources, tmp_path / "cache", TINY, progress=False)
    assert summary["cached"] == 2 and summary["prepared"] == 2
    assert [s["case_id"] for s in summary["skipped"]] == [bad.case_id]
    assert "cannot be read" in summary["skipped"][0]["reason"]
    assert summary["cases_in_cache"] == 4


def test_other_geometry_into_same_cache_is_refused(tmp_path, sources):
    prepare(sources[:1], tmp_path / "cache", TINY, progress=False)
    with pytest.raises(ValueError, match="was prepared with"):
        prepare(sources[:1], tmp_path / "cache", PrepareConfig(size=48, spacing=2.0), progress=False)


def test_worker_processes_give_the_same_cache(tmp_path, sources):
    prepare(sources, tmp_path / "a", TINY, num_workers=1, progress=False)
    prepare(sources, tmp_path / "b", TINY, num_workers=2, progress=False)
    for case_dir in (tmp_path / "a" / "cases").glob("*/*"):
        other = tmp_path / "b" / case_dir.relative_to(tmp_path / "a")
        np.testing.assert_array_equal(np.load(case_dir / "images.npy"), np.load(other / "images.npy"))


def test_splits_are_case_level_stable_and_disjoint():
    config = PrepareConfig(val_fraction=0.2, test_fraction=0.2)
    keys = [f"d/case{i}" for i in range(10)]
    splits = assign_splits(keys, {}, config)
    assert sorted(splits.values()).count("test") == 2 and sorted(splits.values()).count("val") == 2
    more = assign_splits(keys + [f"d/case{i}" for i in range(10, 15)], splits, config)
    assert all(more[k] == v for k, v in splits.items())  # existing cases keep their split
    assert list(more.values()).count("test") == 3
    assert assign_splits(["e/only"], {}, config) == {"e/only": "train"}
    small = assign_splits([f"s/c{i}" for i in range(3)], {}, PrepareConfig())
    assert sorted(small.values()) == ["test", "train", "train"]  # 10 % of 3 still holds out one test case
    four = assign_splits([f"s/c{i}" for i in range(4)], {}, PrepareConfig())
    assert sorted(four.values()) == ["test", "train", "train", "val"]


def test_crop_or_pad_centres_the_window():
    vol = np.arange(100, dtype=float).reshape(10, 10, 1)
    out = crop_or_pad(vol, (5, 5), 4)
    np.testing.assert_array_equal(out[..., 0], vol[3:7, 3:7, 0])
    padded = crop_or_pad(vol, (1, 1), 6)
    assert padded.shape == (6, 6, 1) and padded[0, 0, 0] == 0 and padded[2, 2, 0] == vol[0, 0, 0]


def test_dataset_selection_and_errors(tmp_path, sources):
    prepare(sources, tmp_path / "cache", TINY, progress=False)
    only = SliceDataset(tmp_path / "cache", split=None, datasets=["isles"], modalities=["dwi", "flair"])
    assert only[0]["images"].shape == (2, 32, 32) and only.available.all()
    crop = SliceDataset(tmp_path / "cache", split=None, crop=16)
    assert crop[0]["images"].shape == (6, 16, 16) and crop[0]["brain_mask"].shape == (16, 16)
    again = SliceDataset(tmp_path / "cache", split=None, crop=16)
    torch.testing.assert_close(crop[3]["images"], again[3]["images"])  # crops: a function of (seed, epoch, index)
    windows = set()
    for epoch in range(6):
        again.set_epoch(epoch)
        windows.add(again[3]["images"].sum().item())
    assert len(windows) > 1  # a new epoch, new crops
    with pytest.raises(CacheError, match="not in this cache"):
        SliceDataset(tmp_path / "cache", modalities=["t1", "pd"])
    with pytest.raises(CacheError, match="not in this cache"):
        SliceDataset(tmp_path / "cache", datasets=["nope"])
    with pytest.raises(CacheError, match="run `mmdiff prepare` first"):
        SliceDataset(tmp_path / "empty")


def test_prepare_cli(tmp_path, capsys):
    write_layout(tmp_path / "gli", "brats2023", n_cases=2)
    code = main(["prepare", f"glioma={tmp_path / 'gli'}", "--out", str(tmp_path / "c"), "--size", "32",
                 "--spacing", "2", "--workers", "1", "--quiet"])
    assert code == 0
    out = capsys.readouterr().out
    assert "prepared 2 case(s)" in out and "glioma: 2 cases" in out
    assert json.loads((tmp_path / "c" / "index.json").read_text())["datasets"] == ["glioma"]


@pytest.mark.real_data
def test_real_brats_case_prepares(brats_sample, tmp_path):
    cases = scan(brats_sample, dataset="brats")[:1]
    summary = prepare(cases, tmp_path / "cache", PrepareConfig(size=192), progress=False)
    assert summary["prepared"] == 1
    ds = SliceDataset(tmp_path / "cache", split=None)
    assert 100 < len(ds) <= 155
    labels = set()
    for i in range(0, len(ds), 5):
        labels |= set(np.unique(ds[i]["seg"].numpy()).tolist())
    assert labels <= {0, 1, 2, 3} and 3 in labels  # BraTS 2018 label 4 is stored as 3
    brain = ds[len(ds) // 2]["brain_mask"]
    assert 0.2 < brain.float().mean() < 0.8


def test_brats_2018_label_4_is_stored_as_3_on_the_phantom_cache(tiny_cache):
    """The BraTS-2021-like phantom cohort writes enhancing tumour as label 4, as BraTS 2018-2021 do;
    the cache stores it as 3 (BraTS 2023), with the other labels unchanged."""
    import nibabel as nib

    from mmdiff.data.cache import SEG, case_dir
    from mmdiff.data.manifest import read_manifest

    cases = [c for c in read_manifest(tiny_cache / "sources" / "phantoms" / "manifest.csv") if c.dataset == "bratslike"]
    assert cases
    for case in cases:
        raw = np.rint(np.asarray(nib.load(case.files["seg"]).dataobj)).astype(int)
        assert 4 in raw and 3 not in raw  # the source convention: the test checks a real remap
        stored = np.load(case_dir(tiny_cache, case.dataset, case.case_id) / SEG)
        labels = set(np.unique(stored).tolist())
        assert labels <= {0, 1, 2, 3} and 3 in labels and 4 not in labels
        # every raw label survives (cropping and resampling aside): 1 and 2 stay, 4 becomes 3
        assert {1, 2} & set(np.unique(raw).tolist()) <= labels


def test_lesion_labels_map_every_cohorts_masks_to_the_caches_labels():
    """BraTS 2018's enhancing 4 is 3; a binary mask stored at full scale (WML: 255, one subject 254) is
    lesion 1; 1 and 2 stay; an interpolated mask rounds first; nothing outside 0-3 is stored."""
    from mmdiff.data.prepare import lesion_labels

    raw = np.array([0, 1, 2, 4, 0.4, 0.6, 3.6, -0.3])
    assert lesion_labels(raw).tolist() == [0, 1, 2, 3, 0, 1, 3, 0]
    assert lesion_labels(raw).dtype == np.uint8
    assert lesion_labels(np.array([0, 255, 254.4])).tolist() == [0, 1, 1]
    assert lesion_labels(np.array([0, 255], dtype=np.uint8)).tolist() == [0, 1]  # no uint8 wrap-around
    # a mask that numbers its lesions: refused as BraTS (lesions 2-4 would be oedema / enhancing), read as binary
    numbered = np.arange(7.0)
    with pytest.raises(VolumeError, match="6 labels .*numbers its lesions.*--mask-labels NAME=binary"):
        lesion_labels(numbered)
    assert lesion_labels(numbered, "binary").tolist() == [0, 1, 1, 1, 1, 1, 1]
    assert lesion_labels(np.array([0, 2, 4, 255.0]), "binary").tolist() == [0, 1, 1, 1]
    with pytest.raises(ValueError, match="choose one of brats, binary"):
        lesion_labels(raw, "instance")


def _numbered_lesions(root, lesions: int):
    """A BraTS-layout case whose mask numbers ``lesions`` separate cubes 1, 2, ... inside the brain."""
    import nibabel as nib

    write_layout(root, "brats2018", n_cases=1)
    (seg_path,) = root.glob("*/*_seg.nii.gz")
    img = nib.load(seg_path)
    seg = np.zeros(img.shape, dtype=np.uint8)
    for k in range(lesions):
        x = 8 + 4 * k
        seg[x:x + 3, 20:23, 13:16] = k + 1
    nib.save(nib.Nifti1Image(seg, img.affine), seg_path)
    return scan(root, dataset="numbered")


def test_a_cohort_whose_masks_number_their_lesions_is_refused_as_brats_and_read_as_binary(tmp_path):
    """Six numbered lesions: skipped under the default (with the fix named), prepared as lesion 1 with
    ``mask_labels={dataset: "binary"}``, which the cache records: extending it under the other
    convention is refused; the same three-lesion mask read both ways gives two fingerprints."""
    from mmdiff.data.cache import fingerprint, read_info

    cases = _numbered_lesions(tmp_path / "six", lesions=6)
    summary = prepare(cases, tmp_path / "as-brats", TINY, progress=False)
    assert summary["prepared"] == 0 and "numbers its lesions" in summary["skipped"][0]["reason"]
    summary = prepare(cases, tmp_path / "as-binary", TINY, progress=False, mask_labels={"numbered": "binary"})
    assert summary["prepared"] == 1
    (case_dir,) = (tmp_path / "as-binary" / "cases" / "numbered").iterdir()
    assert set(np.unique(np.load(case_dir / "seg.npy")).tolist()) == {0, 1}
    assert read_info(tmp_path / "as-binary")["mask_labels"] == {"numbered": "binary"}
    with pytest.raises(ValueError, match="'numbered' was prepared with mask labels 'binary'.*reads its masks as 'brats'"):
        prepare(cases, tmp_path / "as-binary", TINY, progress=False)
    with pytest.raises(ValueError, match="mask labels 'numbers'.*choose one of brats, binary"):
        prepare(cases, tmp_path / "typo", TINY, progress=False, mask_labels={"numbered": "numbers"})

    three = _numbered_lesions(tmp_path / "three", lesions=3)
    prepare(three, tmp_path / "three-brats", TINY, progress=False)
    prepare(three, tmp_path / "three-binary", TINY, progress=False, mask_labels={"numbered": "binary"})
    assert "mask_labels" not in read_info(tmp_path / "three-brats")  # the default is not recorded
    assert fingerprint(tmp_path / "three-brats") != fingerprint(tmp_path / "three-binary")


def test_prepare_command_takes_mask_labels_per_dataset(tmp_path, capsys):
    _numbered_lesions(tmp_path / "six", lesions=6)
    out = tmp_path / "cache"
    assert main(["prepare", f"numbered={tmp_path / 'six'}", "--out", str(out), "--size", "32", "--spacing", "2",
                 "--mask-labels", "other=binary", "--quiet"]) == 2
    assert "no dataset named 'other' (datasets: numbered)" in capsys.readouterr().err
    assert not out.exists()  # refused before anything was written
    assert main(["prepare", f"numbered={tmp_path / 'six'}", "--out", str(out), "--size", "32", "--spacing", "2",
                 "--mask-labels", "numbered=binary", "--quiet", "--workers", "1"]) == 0
    assert json.loads((out / "cache.json").read_text())["mask_labels"] == {"numbered": "binary"}
    assert json.loads((out / "summary.json").read_text())["prepared"] == 1


def test_a_data_config_source_says_how_its_masks_are_numbered(tmp_path):
    """``data.build.sources[i].mask_labels`` reaches prepare: the numbered cohort is prepared as binary."""
    from mmdiff.data.cache import read_info
    from mmdiff.training.data import build_cache

    _numbered_lesions(tmp_path / "six", lesions=6)
    source = {"name": "numbered", "path": str(tmp_path / "six"), "mask_labels": "binary"}
    build_cache(tmp_path / "cache", {"sources": [source], "size": 32, "spacing": 2.0, "workers": 1})
    assert read_info(tmp_path / "cache")["mask_labels"] == {"numbered": "binary"}
    (case_dir,) = (tmp_path / "cache" / "cases" / "numbered").iterdir()
    assert set(np.unique(np.load(case_dir / "seg.npy")).tolist()) == {0, 1}
