"""The foundation end to end: phantom cohorts (+ the real BraTS sample) -> manifest -> cache -> MCBS batches."""

import json

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmdiff.cli import main
from mmdiff.data import ModalityConsistentBatchSampler, SliceDataset, SynthesisConditionSampler


def _check_batches(cache, batch_size=4):
    train = SliceDataset(cache, split="train")
    sampler = ModalityConsistentBatchSampler(train.groups, batch_size=batch_size, seed=0)
    loader = DataLoader(train, batch_sampler=sampler, num_workers=0)
    conditions = SynthesisConditionSampler(mode="random", seed=0)
    seen = set()
    for batch in loader:
        assert batch["images"].shape[0] == batch_size
        assert (batch["dataset_id"] == batch["dataset_id"][0]).all()
        assert (batch["available"] == batch["available"][0]).all()
        sources, targets = conditions.batch(batch["available"])
        assert not (sources & ~batch["available"]).any() and sources.any(dim=1).all()
        # no image where the modality is missing
        assert not batch["images"][~batch["available"]].any()
        seen.update(zip(batch["case_id"], batch["slice"].tolist()))
    assert len(seen) == len(train)  # every training slice once per epoch (plus padding duplicates)
    return train


def test_phantom_cohorts_to_batches(tmp_path, capsys):
    assert main(["phantom", str(tmp_path / "ph"), "--cases", "3", "--spacing", "3", "--quiet"]) == 0
    assert main(["prepare", str(tmp_path / "ph" / "manifest.csv"), "--out", str(tmp_path / "cache"),
                 "--size", "64", "--spacing", "3", "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "0 skipped" in out
    summary = json.loads((tmp_path / "cache" / "summary.json").read_text())
    assert summary["cases_in_cache"] == 12 and not summary["skipped"]
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    assert index["datasets"] == ["glioma", "immune", "bratslike", "stroke"]
    for dataset in index["datasets"]:  # 3 cases each: two to train on, one held out for testing
        splits = sorted(c["split"] for c in index["cases"] if c["dataset"] == dataset)
        assert splits == ["test", "train", "train"]
    train = _check_batches(tmp_path / "cache")
    assert {g[0] for g in train.groups} == {0, 1, 2, 3}
    # brain masks of the unstripped cohorts come from their files, not thresholds: no skull in the cache
    stroke = SliceDataset(tmp_path / "cache", split=None, datasets=["stroke"])
    middle = stroke[len(stroke) // 2]
    assert 0.15 < middle["brain_mask"].float().mean() < 0.7


@pytest.mark.real_data
def test_phantoms_plus_real_brats_to_batches(brats_sample, tmp_path):
    assert main(["phantom", str(tmp_path / "ph"), "--cases", "2", "--spacing", "3", "--quiet",
                 "--cohorts", "glioma", "stroke"]) == 0
    assert main(["prepare", str(tmp_path / "ph" / "manifest.csv"), f"brats={brats_sample}",
                 "--out", str(tmp_path / "cache"), "--size", "64", "--spacing", "3", "--workers", "2",
                 "--quiet"]) == 0
    index = json.loads((tmp_path / "cache" / "index.json").read_text())
    brats = [c for c in index["cases"] if c["dataset"] == "brats"]
    assert len(brats) == sum(1 for d in brats_sample.iterdir() if d.is_dir()) and all(c["modalities"] == ["t1", "t2", "t1c", "flair"] for c in brats)
    assert sorted(c["split"] for c in brats).count("train") >= 8
    train = _check_batches(tmp_path / "cache")
    ids = {g[0] for g in train.groups}
    assert index["datasets"].index("brats") in ids
    # real images after normalisation: in [0, 1], brain > background
    item = SliceDataset(tmp_path / "cache", split="train", datasets=["brats"])[40]
    assert torch.all((item["images"] >= 0) & (item["images"] <= 1))
    assert item["images"][0][item["brain_mask"]].mean() > 0.2
    assert np.isclose(item["images"][0][~item["brain_mask"]].abs().sum().item(), 0)
