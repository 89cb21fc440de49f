"""Phantom cohorts: layouts, manifest coverage, determinism, geometry, and the direction of every contrast."""

from __future__ import annotations

import filecmp

import nibabel as nib
import numpy as np
import pytest

from mmdiff.data import phantom
from mmdiff.data.manifest import read_manifest
from mmdiff.io import OverwriteError, load_volume
from mmdiff.viz import display, montage

SPACING = 3.0
CSF, GM, WM, LESION = 1, 2, 3, 4


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    cases = phantom.write_cohorts(out, cases=2, seed=0, spacing=SPACING, progress=False)
    return out, cases


@pytest.fixture(scope="module")
def glioma():
    return phantom.simulate_case("glioma", 0, seed=0, spacing=2.0)


@pytest.fixture(scope="module")
def stroke():
    return phantom.simulate_case("stroke", 0, seed=0, spacing=1.0)


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_layouts_and_manifest_coverage(written):
    out, cases = written
    assert (out / "glioma/PhantomGLI-00001-000/PhantomGLI-00001-000-t1n.nii.gz").is_file()
    for suffix in ("t1c", "t2w", "t2f", "dwi", "adc", "seg"):
        assert (out / f"glioma/PhantomGLI-00002-000/PhantomGLI-00002-000-{suffix}.nii.gz").is_file()
    for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
        assert (out / f"bratslike/BraTS2021_00001/BraTS2021_00001_{suffix}.nii.gz").is_file()
    sub = out / "stroke/rawdata/sub-strokecase0001/ses-0001"
    assert (sub / "dwi/sub-strokecase0001_ses-0001_dwi.nii.gz").is_file()
    assert (sub / "dwi/sub-strokecase0001_ses-0001_adc.nii.gz").is_file()
    assert (sub / "anat/sub-strokecase0001_ses-0001_FLAIR.nii.gz").is_file()
    assert (out / "stroke/derivatives/sub-strokecase0001/ses-0001/sub-strokecase0001_ses-0001_msk.nii.gz").is_file()
    assert (out / "immune/derivatives/sub-immune0001/ses-01/sub-immune0001_ses-01_msk.nii.gz").is_file()
    assert any((out / "immune/rawdata/sub-immune0001/ses-01").rglob("*_ses-01_*.nii.gz"))
    # heads that are not skull-stripped come with a brain mask; skull-stripped cohorts need none
    assert (out / "stroke/derivatives/sub-strokecase0001/ses-0001/"
            "sub-strokecase0001_ses-0001_desc-brain_mask.nii.gz").is_file()
    assert not list((out / "glioma").rglob("*brain*"))

    manifest = read_manifest(out / "manifest.csv")
    assert [(c.case_id, c.dataset, sorted(c.files)) for c in manifest] == \
           [(c.case_id, c.dataset, sorted(c.files)) for c in cases]
    coverage = {}
    for case in manifest:
        assert all(p.is_file() and p.is_relative_to(out) for p in case.files.values())
        assert "seg" in case.files
        assert ("brainmask" in case.files) == (case.dataset in ("immune", "stroke"))
        coverage.setdefault(case.dataset, []).append(set(case.modalities))
    assert set(coverage) == {"glioma", "immune", "bratslike", "stroke"}
    assert coverage["glioma"] == [{"t1", "t2", "t1c", "flair", "dwi", "adc"}] * 2
    assert coverage["bratslike"] == [{"t1", "t2", "t1c", "flair"}] * 2
    assert coverage["stroke"] == [{"flair", "dwi", "adc"}] * 2
    for mods in coverage["immune"]:
        assert len(mods) >= 2 and mods <= {"t1", "t2", "flair", "adc"}
    for line in (out / "manifest.csv").read_text().splitlines()[1:]:
        assert not line.split(",")[3].startswith("/")  # relative to the manifest


def test_immune_subsets_vary():
    subsets = {tuple(phantom.simulate_case("immune", i, spacing=6.0).images) for i in range(8)}
    assert len(subsets) >= 3
    assert all(len(s) >= 2 and set(s) <= {"t1", "t2", "flair", "adc"} for s in subsets)


def test_files_int16_simulated_and_readable(written):
    out, cases = written
    for case in cases:
        for kind, path in case.files.items():
            img = nib.load(str(path))
            assert img.get_data_dtype() == (np.uint8 if kind in ("seg", "brainmask") else np.int16), path
            assert img.header["descrip"].item().decode().startswith(f"mmdiff phantom (simulated) {case.dataset}")
            vol = load_volume(path)
            assert vol.data.dtype == np.float32 and vol.data.ndim == 3
            if kind != "seg":
                assert vol.data.max() > 0


def test_same_seed_same_bytes_other_seed_differs(written, tmp_path):
    out, _ = written
    again = tmp_path / "again"
    phantom.write_cohorts(again, cases=1, seed=0, spacing=SPACING, progress=False)  # fewer cases
    first = [p for p in _files(again) if p.name != "manifest.csv"]
    assert first and all(filecmp.cmp(out / p, again / p, shallow=False) for p in first)
    other = tmp_path / "other"
    phantom.write_cohorts(other, cases=1, seed=1, spacing=SPACING, cohorts=["glioma"], progress=False)
    name = "glioma/PhantomGLI-00001-000/PhantomGLI-00001-000-t1n.nii.gz"
    assert not filecmp.cmp(out / name, other / name, shallow=False)


def test_refuses_to_overwrite(written, tmp_path):
    out, _ = written
    with pytest.raises(OverwriteError):
        phantom.write_cohorts(out, cases=1, spacing=SPACING, progress=False)
    case = phantom.simulate_case("stroke", 0, spacing=6.0)
    phantom.write_case(case, tmp_path)
    with pytest.raises(OverwriteError):
        phantom.write_case(case, tmp_path)
    phantom.write_case(case, tmp_path, overwrite=True)


def test_bratslike_geometry_and_labels(written):
    out, cases = written
    assert phantom.COHORTS["bratslike"].grid.grid(1.0).shape == (240, 240, 155)
    case = next(c for c in cases if c.dataset == "bratslike")
    img = nib.load(str(case.files["t1"]))
    assert nib.aff2axcodes(img.affine) == ("L", "P", "S")
    assert img.shape == (80, 80, 52)
    sim = phantom.simulate_case("bratslike", 0, spacing=SPACING)
    vol = load_volume(case.files["t1c"])
    np.testing.assert_array_equal(vol.data, sim.images["t1c"])  # LPS on disk, RAS in memory
    np.testing.assert_allclose(vol.affine, sim.affine)
    labels = set(np.unique(np.asarray(nib.load(str(case.files["seg"])).dataobj)))
    assert labels <= {0, 1, 2, 4} and 4 in labels and 2 in labels
    assert (sim.images["t1"][~sim.brain_mask] == 0).all()  # skull-stripped


def test_glioma_contrasts(glioma):
    im, seg, tissue = glioma.images, glioma.seg, glioma.tissue
    assert set(np.unique(seg)) <= {0, 1, 2, 3} and {1, 2, 3} <= set(np.unique(seg))
    wm = (tissue == WM) & (seg == 0)
    gm = (tissue == GM) & (seg == 0)
    csf = (tissue == CSF) & (seg == 0)
    enh, oedema, necrosis = seg == 3, seg == 2, seg == 1
    mean = lambda m, sel: float(im[m][sel].mean())  # noqa: E731
    # normal tissue on every sequence
    assert mean("t1", wm) > mean("t1", gm) > mean("t1", csf)
    assert mean("t2", csf) > mean("t2", gm) > mean("t2", wm)
    assert mean("flair", csf) < mean("flair", wm)  # CSF nulled
    assert mean("adc", csf) > mean("adc", gm) > mean("adc", wm)
    assert mean("dwi", csf) < mean("dwi", wm)
    # gadolinium: the rim enhances on T1C only
    assert mean("t1c", enh) / mean("t1c", wm) > 1.3 * mean("t1", enh) / mean("t1", wm)
    assert mean("t1c", enh) > mean("t1c", wm)
    # oedema bright on T2 and FLAIR, necrosis dark on T1C, solid tumour restricts diffusion
    assert mean("flair", oedema) > mean("flair", wm)
    assert mean("t2", oedema) > mean("t2", wm)
    assert mean("t1c", necrosis) < mean("t1c", enh)
    assert mean("adc", enh) < mean("adc", oedema) < mean("adc", necrosis)
    assert mean("dwi", enh) > mean("dwi", wm)
    for name, arr in im.items():
        assert arr.dtype == np.float32 and arr.shape == seg.shape
        assert (arr == np.round(arr)).all()
    assert glioma.brain_mask.dtype == bool and seg.dtype == np.uint8


def test_stroke_contrasts_and_grids(stroke, written):
    im, seg, tissue = stroke.images, stroke.seg > 0, stroke.tissue
    normal = np.isin(tissue, (GM, WM)) & ~seg
    assert seg.sum() > 20
    assert im["dwi"][seg].mean() > 1.3 * im["dwi"][normal].mean()
    assert im["adc"][seg].mean() < 0.8 * im["adc"][normal].mean()
    assert 500 < im["adc"][normal].mean() < 1200  # 10^-6 mm^2/s
    assert im["flair"][seg].mean() > im["flair"][normal].mean()
    assert im["flair"][tissue == CSF].mean() < im["flair"][tissue == WM].mean()

    out, cases = written
    case = next(c for c in cases if c.dataset == "stroke")
    dwi, flair, msk = (nib.load(str(case.files[k])) for k in ("dwi", "flair", "seg"))
    assert flair.shape != dwi.shape and not np.allclose(flair.affine, dwi.affine)
    assert np.allclose(msk.affine, dwi.affine) and msk.shape == dwi.shape
    assert np.allclose(np.sqrt((dwi.affine[:3, :3] ** 2).sum(0)), 2.0 * SPACING)


def test_immune_lesions_bright_on_flair():
    case = next(c for c in (phantom.simulate_case("immune", i, spacing=1.0) for i in range(6))
                if "flair" in c.images and (c.seg > 0).sum() > 50)
    les, wm = case.seg > 0, (case.tissue == WM) & (case.seg == 0)
    assert case.images["flair"][les].mean() > 1.2 * case.images["flair"][wm].mean()
    assert np.allclose(np.sqrt((case.affine[:3, :3] ** 2).sum(0)), (1.0, 1.0, 3.0))


def test_simulate_case_arguments():
    with pytest.raises(KeyError):
        phantom.simulate_case("nope", 0)
    with pytest.raises(ValueError):
        phantom.simulate_case("glioma", 0, spacing=0)
    a = phantom.simulate_case("stroke", 3, seed=5, spacing=6.0)
    b = phantom.simulate_case("stroke", 3, seed=5, spacing=6.0)
    assert a.case_id == "sub-strokecase0004_ses-0001"
    for m in a.images:
        np.testing.assert_array_equal(a.images[m], b.images[m])


def test_display_is_radiological():
    vol = np.zeros((10, 12, 5))
    vol[9, 11, 2] = 1  # patient's right (x high), anterior (y high)
    axial = display(vol, 2, 2)
    assert axial.shape == (12, 10) and axial[0, 0] == 1  # top left: anterior, patient's right
    vol = np.zeros((10, 12, 5))
    vol[9, 3, 4] = 1  # right, superior
    assert display(vol, 1, 3)[0, 0] == 1


def test_montage_writes_png(tmp_path, glioma):
    from PIL import Image

    rng = np.random.default_rng(0)
    coloured = np.zeros((8, 8, 3), np.uint8)
    coloured[..., 0] = 200  # red
    path = montage([("inputs", [("t1", rng.random((20, 30))), ("t2", rng.random((30, 20)))]),
                    ("rgb", [("x", coloured)])], tmp_path / "m.png", cell=64, title="t")
    with Image.open(path) as img:
        assert img.mode == "RGB" and img.height > 2 * 64 and np.asarray(img)[..., 0].max() == 255
        assert (np.asarray(img)[..., 1][np.asarray(img)[..., 0] == 200] == 0).any()  # the red panel
    # grey panels only: one grey channel (the same pixels as the RGB canvas, half the file)
    grey = montage([("inputs", [("t1", rng.random((20, 30)))])], tmp_path / "g.png", cell=64, title="t")
    with Image.open(grey) as img:
        assert img.mode == "L" and img.getextrema()[1] == 255  # white labels, grey images
