import pytest

from conftest import write_layout
from mmdiff.cli import main
from mmdiff.data.layouts import LayoutError, detect_layout, scan
from mmdiff.data.manifest import ManifestError, read_manifest, write_manifest


@pytest.mark.parametrize("layout", ["brats2018", "brats2023"])
def test_brats_layouts(tmp_path, layout):
    write_layout(tmp_path / "data", layout, n_cases=2)
    assert detect_layout(tmp_path / "data") == layout
    cases = scan(tmp_path / "data", dataset="gli")
    assert len(cases) == 2
    for case in cases:
        assert case.dataset == "gli"
        assert sorted(case.files) == sorted(["t1", "t1c", "t2", "flair", "seg"])
        assert all(p.is_absolute() and p.exists() for p in case.files.values())


def test_bids_isles_layout(tmp_path):
    write_layout(tmp_path / "isles", "bids", n_cases=3)
    assert detect_layout(tmp_path / "isles") == "bids"
    cases = scan(tmp_path / "isles")
    assert [c.case_id for c in cases] == [f"sub-strokecase{i:04d}_ses-0001" for i in range(3)]
    assert all(c.dataset == "isles" for c in cases)  # default name: the folder's
    assert all(sorted(c.files) == ["adc", "dwi", "flair", "seg"] for c in cases)


def test_extra_modalities_by_alias(tmp_path):
    write_layout(tmp_path / "d", "brats2023", n_cases=1)
    case_dir = next((tmp_path / "d").iterdir())
    (case_dir / f"{case_dir.name}-t1n.nii.gz").rename(case_dir / f"{case_dir.name}-dwi.nii.gz")
    (case_dir / f"{case_dir.name}-notes.txt").write_text("ignored")
    (case, ) = scan(tmp_path / "d")
    assert "dwi" in case.files and "t1" not in case.files


def test_manifest_round_trip_relative_paths(tmp_path):
    write_layout(tmp_path / "d", "brats2018", n_cases=2)
    cases = scan(tmp_path / "d", dataset="x")
    write_manifest(cases, tmp_path / "manifest.csv")
    text = (tmp_path / "manifest.csv").read_text().splitlines()
    assert text[0] == "case_id,dataset,modality,path"
    assert all(not row.split(",")[3].startswith("/") for row in text[1:])
    again = read_manifest(tmp_path / "manifest.csv")
    assert [(c.case_id, c.dataset, c.files) for c in again] == [(c.case_id, c.dataset, c.files) for c in cases]
    assert detect_layout(tmp_path / "manifest.csv") == "manifest"


def test_bad_manifests(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("case_id,dataset,modality,path\na,d,pd,x.nii.gz\n")
    with pytest.raises(ManifestError, match="row 2: unknown modality 'pd'"):
        read_manifest(bad)
    bad.write_text("case,path\n")
    with pytest.raises(ManifestError, match="needs the columns"):
        read_manifest(bad)
    bad.write_text("case_id,dataset,modality,path\na,d,t1,x.nii.gz\na,d,t1w,y.nii.gz\n")
    with pytest.raises(ManifestError, match="lists t1 twice"):
        read_manifest(bad)


def test_unknown_layout_error(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "scan.nii.gz").write_bytes(b"")
    with pytest.raises(LayoutError, match="no NIfTI files named in a known layout"):
        scan(tmp_path / "x")


def test_scan_cli_writes_manifest(tmp_path, capsys):
    write_layout(tmp_path / "d", "brats2023", n_cases=2)
    assert main(["scan", str(tmp_path / "d"), "--dataset", "g", "--out", str(tmp_path / "m.csv")]) == 0
    assert "layout: brats2023" in capsys.readouterr().out
    assert len(read_manifest(tmp_path / "m.csv")) == 2
    assert main(["scan", str(tmp_path / "nowhere")]) == 2
    assert "no such folder" in capsys.readouterr().err


@pytest.mark.real_data
def test_real_brats_sample_cases_are_complete(brats_sample, tmp_path):
    folders = sum(1 for d in brats_sample.iterdir() if d.is_dir())  # the sample grew from 12 to 23 cases
    cases = scan(brats_sample, dataset="brats")
    assert len(cases) == folders >= 12
    for case in cases:
        assert sorted(case.files) == sorted(["t1", "t2", "t1c", "flair", "seg"])
    assert main(["scan", str(brats_sample), "--out", str(tmp_path / "m.csv")]) == 0
    assert len(read_manifest(tmp_path / "m.csv")) == folders
