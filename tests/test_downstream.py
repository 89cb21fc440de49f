"""Downstream segmentation Dice: regions, the metric, and the real / synthetic / lacking comparison."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from mmdiff.cli import main
from mmdiff.evaluation.downstream import dice, downstream_dice, region_channels
from test_pipelines import tiny_gan


def test_brats_regions_from_labels():
    labels = np.array([0, 1, 2, 3])  # background, necrotic core, oedema, enhancing
    regions = region_channels(labels).numpy().astype(bool)
    np.testing.assert_array_equal(regions[0], [False, True, True, True])  # WT
    np.testing.assert_array_equal(regions[1], [False, True, False, True])  # TC
    np.testing.assert_array_equal(regions[2], [False, False, False, True])  # ET


def test_dice_per_region():
    labels = np.zeros((8, 8, 4), dtype=np.uint8)
    labels[2:6, 2:6, 1:3] = 2
    labels[3:5, 3:5, 1:3] = 3
    perfect = region_channels(labels).numpy().astype(bool)
    assert dice(perfect, labels) == {"WT": 1.0, "TC": 1.0, "ET": 1.0}
    half = perfect.copy()
    half[:, :, :, 2] = False  # one of the two tumour slices missed
    scores = dice(half, labels)
    assert scores["WT"] == pytest.approx(2 * 16 / (16 + 32))
    assert scores["ET"] == pytest.approx(2 * 4 / (4 + 8))


def test_oracle_synthesis_scores_like_the_real_sequence(tiny_cache, tmp_path):
    def oracle(case, sources, target):  # a perfect synthesis: the real image itself
        assert target not in sources
        return case.images[target]

    rows = downstream_dice(tiny_cache, oracle, tmp_path / "d", replace="t1c", dataset="glioma", steps=20,
                           progress=False)
    by = {(r["case"], r["condition"]): r for r in rows}
    cases = {r["case"] for r in rows}
    assert {c for _, c in by} == {"real", "synthetic", "lacking"}
    for case in cases:
        assert {k: by[case, "synthetic"][k] for k in ("WT", "TC", "ET")} == \
               {k: by[case, "real"][k] for k in ("WT", "TC", "ET")}
    assert "| all real sequences |" in (tmp_path / "d" / "dice.md").read_text()
    with pytest.raises(FileExistsError):
        downstream_dice(tiny_cache, oracle, tmp_path / "d", dataset="glioma", steps=1, progress=False)

    def blank(case, sources, target):
        return np.zeros_like(case.images[target])

    saved = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "networks").iterdir()}
    assert set(saved) == {"full.safetensors", "full.json", "without-t1c.safetensors", "without-t1c.json"}
    again = downstream_dice(tiny_cache, blank, tmp_path / "d", replace="t1c", dataset="glioma", steps=20,
                            progress=False, overwrite=True)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d" / "networks").iterdir()} == saved  # reused
    assert [r for r in again if r["condition"] != "synthetic"] == [r for r in rows if r["condition"] != "synthetic"]


def test_downstream_command(tiny_cache, tmp_path, capsys):
    tiny_gan().save_pretrained(tmp_path / "gan")
    code = main(["downstream", "--data", str(tiny_cache), "--dataset", "glioma", "--pipeline", str(tmp_path / "gan"),
                 "--steps", "5", "--out", str(tmp_path / "d"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    assert "T1C synthesised by gan" in capsys.readouterr().out
    with open(tmp_path / "d" / "dice.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["condition"] for r in rows} == {"real", "synthetic", "lacking"}
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("WT", "TC", "ET"))
    assert main(["downstream", "--data", str(tiny_cache), "--dataset", "glioma", "--replace", "dwi",
                 "--pipeline", str(tmp_path / "gan"), "--steps", "1", "--out", str(tmp_path / "e"), "--quiet"]) == 0
    assert main(["downstream", "--data", str(tiny_cache), "--dataset", "glioma", "--replace", "pd",
                 "--pipeline", str(tmp_path / "gan"), "--steps", "1", "--out", str(tmp_path / "f"), "--quiet"]) == 2
    assert "not among the cases' sequences" in capsys.readouterr().err
