"""The browser demo's parts without a browser: upload checks, safe names, synthesis through
``mmdiff.synthesize``, per-visitor folders, rendering, examples, the Space files, and two visitors
at once through gradio's queue (gradio_client)."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from mmdiff import demo as d
from mmdiff.io import is_synthetic
from conftest import REPO, blob_volume, centred_affine


@pytest.fixture(scope="module")
def gan():
    engines = d.load_engines(engines=["gan"])
    engines["gan"].pipeline.set_progress_bar_config(disable=True)
    return engines["gan"]


def write(path: Path, data, affine=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), centred_affine(np.shape(data)[:3]) if affine is None else affine),
             str(path))
    return path


@pytest.fixture
def exam(tmp_path):
    """Two sequences of one small exam, on one grid, under awkward upload names."""
    t1, _, _ = blob_volume(seed=0)
    t2, _, _ = blob_volume(seed=1, scale=700.0)
    return {"t1": write(tmp_path / "up" / "my scan (1);rm -rf.nii.gz", t1.get_fdata(), t1.affine),
            "t2": write(tmp_path / "up2" / "..T2 ünïcode.nii.gz", t2.get_fdata(), t2.affine)}


def test_display_name_keeps_no_path_and_no_odd_characters():
    assert d.display_name("/tmp/gradio/abc/../../etc/passwd") == "passwd"
    assert d.display_name("/x/my scan (1);rm -rf.nii.gz") == "my_scan_1_rm_-rf.nii.gz"
    assert d.display_name("/x/" + "a" * 200 + ".nii.gz").startswith("a" * 28 + "...")
    assert d.display_name("") == "file"


@pytest.mark.parametrize("case, expected", [
    ("png", "is not a NIfTI file"),
    ("large", "the limit is 0.01 MB"),
    ("4d", "is 4D with shape (8, 8, 8, 3)"),
    ("nan", "every voxel is NaN or infinite"),
    ("zero", "every voxel is 0"),
    ("damaged", "cannot be read as NIfTI"),
    ("voxels", "the limit is 0 M"),
])
def test_bad_uploads_get_one_line_messages(tmp_path, case, expected):
    rng = np.random.default_rng(0)
    if case == "png":
        path = tmp_path / "photo.png"
        path.write_bytes(b"\x89PNG\r\n")
    elif case == "large":
        path = write(tmp_path / "big.nii", rng.random((32, 32, 32)).astype(np.float32))
    elif case == "4d":
        path = write(tmp_path / "series.nii.gz", rng.random((8, 8, 8, 3)).astype(np.float32))
    elif case == "nan":
        path = write(tmp_path / "nan.nii.gz", np.full((8, 8, 8), np.nan, np.float32))
    elif case == "zero":
        path = write(tmp_path / "zero.nii.gz", np.zeros((8, 8, 8), np.float32))
    elif case == "damaged":
        path = tmp_path / "damaged.nii.gz"
        path.write_bytes(b"\x1f\x8b not really gzip")
    else:
        path = write(tmp_path / "many.nii.gz", rng.random((8, 8, 8)).astype(np.float32))
    kwargs = {"max_mb": 0.01} if case == "large" else {"max_voxels": 100} if case == "voxels" else {}
    with pytest.raises(d.DemoInputError) as info:
        d.check_upload("t1", path, **kwargs)
    message = str(info.value)
    assert expected in message
    assert message.startswith(f"T1 ({path.name})") and "\n" not in message
    assert str(tmp_path) not in message  # the server's folders are not shown


def test_every_problem_is_listed_and_grids_must_overlap(tmp_path, exam):
    far = centred_affine((40, 44, 30))
    far[:3, 3] += 500.0
    flair, _, _ = blob_volume(seed=2)
    path = write(tmp_path / "flair.nii.gz", flair.get_fdata(), far)  # the same picture, 50 cm away
    with pytest.raises(d.DemoInputError) as info:
        d.check_inputs({**exam, "flair": path, "dwi": tmp_path / "notes.txt"}, list(d.MODALITIES))
    lines = str(info.value).splitlines()
    assert any(line.startswith("DWI (notes.txt) is not a NIfTI file") for line in lines)
    assert any("FLAIR (flair.nii.gz) does not overlap T1 (my_scan_1_rm_-rf.nii.gz)" in line for line in lines)
    with pytest.raises(d.DemoInputError, match="upload at least one sequence"):
        d.check_inputs({"t1": None}, list(d.MODALITIES))
    with pytest.raises(d.DemoInputError, match="does not take PD"):
        d.check_inputs({"pd": exam["t1"]}, list(d.MODALITIES))


def test_some_nan_voxels_are_a_note(tmp_path, exam):
    data = nib.load(str(exam["t2"])).get_fdata().astype(np.float32)
    data[:2] = np.nan
    path = write(tmp_path / "t2nan.nii.gz", data)
    checked, mask, notes = d.check_inputs({"t1": exam["t1"], "t2": path}, list(d.MODALITIES))
    assert list(checked) == ["t1", "t2"] and mask is None
    assert notes == [f"T2 (t2nan.nii.gz): {2 * 44 * 30} NaN/Inf voxels were set to 0"]


def test_run_synthesis_writes_what_the_cli_writes_under_safe_names(tmp_path, exam, gan):
    before = {m: hashlib.sha256(p.read_bytes()).hexdigest() for m, p in exam.items()}
    folder = tmp_path / "session" / "run-1"
    result, notes = d.run_synthesis(gan, exam, folder, dataset="glioma", targets=["flair", "t1"])
    assert notes == ["T1 was uploaded, so it is an input, not a target"]
    # the visitor's file names never reach the file system
    names = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert names == ["inputs/t1.nii.gz", "inputs/t2.nii.gz", "synthetic/flair_synthetic.json",
                     "synthetic/flair_synthetic.nii.gz"]
    assert {m: hashlib.sha256(p.read_bytes()).hexdigest() for m, p in exam.items()} == before
    out = folder / "synthetic" / "flair_synthetic.nii.gz"
    assert is_synthetic(out) and nib.load(str(out)).shape == (40, 44, 30)
    sidecar = json.loads((folder / "synthetic" / "flair_synthetic.json").read_text())
    assert sidecar["synthetic"] is True and sidecar["engine"] == "gan" and sidecar["dataset"] == "glioma"
    assert sidecar["targets"] == ["flair"] and set(sidecar["inputs"]) == {"t1", "t2"}
    assert result.files == [str(out), str(out.with_name("flair_synthetic.json"))]
    assert set(result.inputs) == {"t1", "t2"} and set(result.synthetic) == {"flair"} and not result.uncertainty
    assert result.synthetic["flair"].dtype == np.uint8 and result.synthetic["flair"].max() > 0
    assert result.shape == (40, 44, 30)
    assert sidecar["flip_average"] is False
    twice, _ = d.run_synthesis(gan, exam, tmp_path / "twice", dataset="glioma", targets=["flair"], flip_average=True)
    assert json.loads((tmp_path / "twice" / "synthetic" / "flair_synthetic.json").read_text())["flip_average"] is True
    assert not np.array_equal(twice.synthetic["flair"], result.synthetic["flair"])


def test_unknown_dataset_and_nothing_to_make(tmp_path, exam, gan):
    result, notes = d.run_synthesis(gan, exam, tmp_path / "a", dataset="nowhere", targets=["t1c"])
    assert "does not know the dataset 'nowhere': used as an unknown site" in notes[0]
    assert list(result.synthetic) == ["t1c"]
    assert json.loads((tmp_path / "a" / "synthetic" / "t1c_synthetic.json").read_text())["dataset"] is None
    everything = {m: exam["t1"] for m in gan.modalities}  # PD too, for a model that knows it
    with pytest.raises(d.DemoInputError, match="nothing to synthesize"):
        d.run_synthesis(gan, everything, tmp_path / "b")


def test_sessions_keep_one_run_and_go_when_the_visitor_leaves(tmp_path):
    sessions = d.Sessions(tmp_path / "root")
    first = sessions.new_run("visitor-a")
    (first / "x").write_text("x")
    second = sessions.new_run("visitor-a")
    other = sessions.new_run("visitor-b")
    assert not first.exists() and second.exists() and other.exists()
    assert second.parent != other.parent and "visitor" not in str(second)
    sessions.remove_run(d.Result(second, (1.0, 1.0, 1.0)))
    assert not second.exists()
    sessions.remove("visitor-b")
    assert not other.parent.exists() and sessions.root.exists()


def test_render_keeps_the_physical_aspect_and_orientation():
    volume = np.zeros((40, 50, 10), np.uint8)
    volume[30:, :, :] = 255  # high x: the patient's right (RAS), on the image's left (radiological view)
    image = d.render_slice(volume, "coronal", 25, (1.0, 1.0, 4.0))
    assert image.size == (256, 256)  # 40 mm wide, 40 mm high
    axial = np.asarray(d.render_slice(volume, "axial", 5, (1.0, 1.0, 4.0)))
    assert axial.shape[:2] == (256, round(40 * 256 / 50))
    assert axial[:, :10].mean() > 200 and axial[:, -10:].mean() < 50
    result = d.Result(Path("."), (1.0, 1.0, 4.0), inputs={"t1": volume}, synthetic={"flair": volume},
                      uncertainty={"flair": volume})
    inputs, synthetic, uncertainty = d.render(result, "sagittal", 3)
    assert [c for _, c in inputs + synthetic + uncertainty] == ["T1 (input)", "FLAIR (synthetic)",
                                                               "FLAIR uncertainty (calibrated)"]
    assert np.asarray(uncertainty[0][0]).ndim == 3  # a colour map
    assert result.centre("sagittal") == 34 and result.centre("axial") == 4  # the middle of what is not 0


def test_examples_are_small_cached_phantoms(tmp_path):
    first = d.build_examples(tmp_path, cohorts=["stroke"], slab_mm=16)
    (example,) = first
    assert example.label == "stroke phantom: DWI + ADC -> FLAIR" and example.targets == ["flair"]
    assert example.dataset == "stroke" and sorted(example.files) == ["adc", "dwi"]
    shapes = {nib.load(str(p)).shape for p in example.files.values()}
    assert len(shapes) == 1 and next(iter(shapes))[2] == 8  # 16 mm of 2 mm slices
    stamp = {m: p.stat().st_mtime_ns for m, p in example.files.items()}
    again = d.build_examples(tmp_path, cohorts=["stroke"], slab_mm=16)[0]
    assert {m: p.stat().st_mtime_ns for m, p in again.files.items()} == stamp  # cached, not rebuilt
    with pytest.raises(ValueError, match="unknown phantom cohort"):
        d.build_examples(tmp_path, cohorts=["nowhere"])


def test_space_metadata_and_requirements_match_the_package():
    text = (REPO / "README.md").read_text()
    assert text.startswith("---\n")
    import yaml

    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and (REPO / meta["app_file"]).is_file()
    assert len(meta["short_description"]) <= 60 and re.fullmatch(r"\d+\.\d+\.\d+", str(meta["sdk_version"]))
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = project["dependencies"] + project["optional-dependencies"]["demo"]
    listed = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith(("#", "-"))]
    name = lambda req: re.split(r"[<>=!~\[ ]", req, maxsplit=1)[0].lower()  # noqa: E731
    assert sorted(map(name, listed)) == sorted(map(name, needed))
    assert "gradio" in map(name, listed)


def test_cli_has_a_demo_command():
    from mmdiff.cli import build_parser

    args = build_parser().parse_args(["demo", "--engines", "gan", "--port", "7999", "--examples", "stroke"])
    assert args.engines == ["gan"] and args.port == 7999 and args.examples == ["stroke"]
    assert args.func.__name__ == "cmd_demo"


# ------------------------------------------------------------------------------ through gradio's queue


def serve(demo):
    """Launch on a free local port without blocking; returns the URL."""
    import gradio.networking

    # gradio's start-up probe gives the first page 3 s; a busy two-core machine can take longer
    probe = gradio.networking.url_ok
    gradio.networking.url_ok = lambda url: any(probe(url) for _ in range(10))
    try:
        _, url, _ = d.launch(demo, server_name="127.0.0.1", prevent_thread_lock=True, quiet=True)
    finally:
        gradio.networking.url_ok = probe
    return url


@pytest.fixture(scope="module")
def small_examples(tmp_path_factory):
    return d.build_examples(tmp_path_factory.mktemp("examples"), cohorts=["stroke"], slab_mm=24)


@pytest.mark.slow
def test_two_visitors_at_once_both_get_their_results(gan, small_examples, tmp_path):
    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    demo = d.build_demo({"gan": gan}, examples=small_examples, sessions=d.Sessions(tmp_path / "sessions"))
    url = serve(demo)
    try:
        (example,) = small_examples
        files = [handle_file(str(example.files[m])) if m in example.files else None for m in gan.modalities]
        args = [*files, None, "stroke", ["flair"], d.ENGINE_LABELS["gan"], 8, 1, 0, False, "axial"]  # no State in the API
        results = {}

        def visit(name):
            results[name] = Client(url, verbose=False).predict(*args, api_name="/synthesize")

        visitors = [threading.Thread(target=visit, args=(name,)) for name in ("a", "b")]
        for v in visitors:
            v.start()
        for v in visitors:
            v.join(120)
        assert set(results) == {"a", "b"}
        for status, _, synthetic, _, downloads, _ in results.values():
            assert status.startswith("**Done.**\n- FLAIR synthesized from DWI, ADC with the one-step GAN")
            synthetic = synthetic["value"] if isinstance(synthetic, dict) else synthetic  # a gr.update() comes as a dict
            assert [item["caption"] for item in synthetic] == ["FLAIR (synthetic)"], synthetic
            names = sorted(Path(f).name for f in downloads)
            assert names == ["flair_synthetic.json", "flair_synthetic.nii.gz"]
            assert is_synthetic(next(f for f in downloads if f.endswith(".nii.gz")))
        # each visitor had a folder of their own; the latest run of each is still there until they leave
        assert len(list((tmp_path / "sessions").iterdir())) == 2
    finally:
        demo.close()


@pytest.mark.slow
def test_diffusion_adds_uncertainty_maps(tmp_path, exam):
    ldm = d.load_engines(engines=["ldm"])["ldm"]
    ldm.pipeline.set_progress_bar_config(disable=True)
    result, notes = d.run_synthesis(ldm, {"t1": exam["t1"]}, tmp_path / "run", dataset="brats", targets=["flair"],
                                    steps=2, samples=2)
    assert [Path(f).name for f in result.files] == ["flair_synthetic.nii.gz", "flair_synthetic.json",
                                                    "flair_uncertainty.nii.gz", "flair_uncertainty.json"]
    assert all(is_synthetic(f) for f in result.files if f.endswith(".nii.gz"))
    sidecar = json.loads(Path(result.files[1]).read_text())
    assert sidecar["engine"] == "ldm" and sidecar["steps"] == 2 and sidecar["samples"] == 2
    assert list(result.uncertainty) == ["flair"] and result.uncertainty["flair"].max() > 0
    assert [c for _, c in d.render(result, "axial", 15)[2]] == ["FLAIR uncertainty (calibrated)"]


def test_diffusion_defaults_are_the_pipelines():
    """The page's diffusion settings start where the pipeline's calibration holds."""
    from mmdiff.pipelines import MMDiffPipeline
    from mmdiff.pipelines.common import call_defaults
    from mmdiff.pipelines.ldm import DEFAULT_NUM_SAMPLES

    assert call_defaults(MMDiffPipeline, "num_inference_steps") == {"num_inference_steps": d.DEFAULT_STEPS}
    assert DEFAULT_NUM_SAMPLES == d.DEFAULT_SAMPLES
