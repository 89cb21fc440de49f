"""The package as users get it: a wheel with the configs, the card template and the published
pipelines, installed outside the checkout; and ``import mmdiff`` as the way into diffusers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import tomllib
import zipfile
from pathlib import Path

import nibabel as nib
import pytest
from conftest import REPO, blob_volume
from setuptools import find_packages

from mmdiff.resources import DEFAULT_PIPELINES, FOLDERS, configs_dir, model_card_template, published_pipeline

#: what a wheel is built from (everything pyproject.toml names)
SOURCES = ["pyproject.toml", "README.md", "mmdiff", *FOLDERS.values()]


def fresh_env(**extra) -> dict:
    """The environment of a user's shell: offline, one thread, nothing pointing at the checkout."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    return env | {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"} | extra


def test_wheel_package_list_matches_the_source_tree():
    """``pyproject.toml`` lists the packages (so it can map the data folders in): a new subpackage
    must be listed, or the wheel would lack it."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    code = set(find_packages(where=str(REPO), include=["mmdiff", "mmdiff.*"]))
    data = {f"mmdiff.{name}" for name in FOLDERS}
    assert listed == code | data, f"add to [tool.setuptools] packages: {sorted(code - listed)}"
    assert setuptools["package-dir"] == {f"mmdiff.{name}": folder for name, folder in FOLDERS.items()}


def test_resources_in_the_checkout():
    assert (configs_dir() / "gan-tiny.yaml").is_file() and (configs_dir() / "accelerate").is_dir()
    assert model_card_template().is_file()
    for engine in DEFAULT_PIPELINES:
        assert (published_pipeline(engine) / "model_index.json").is_file()
    with pytest.raises(ValueError, match="unknown engine 'vae': choose ldm or gan"):
        published_pipeline("vae")


def test_import_mmdiff_is_enough_for_diffusers_and_cheap():
    """``import mmdiff`` imports neither torch nor diffusers; a later ``import diffusers`` finds the
    mmdiff pipeline classes (importing them on first use), and diffusers' own names still resolve."""
    gan = published_pipeline("gan")
    script = textwrap.dedent(f"""
        import sys
        import mmdiff
        assert not {{"torch", "diffusers", "mmdiff.pipelines"}} & set(sys.modules), sorted(sys.modules)
        import diffusers
        from diffusers import DiffusionPipeline, DDIMScheduler
        assert "mmdiff.pipelines" not in sys.modules
        pipe = DiffusionPipeline.from_pretrained({str(gan)!r})
        from mmdiff.pipelines import MMGANPipeline, MMDiffPipeline
        assert type(pipe) is MMGANPipeline and diffusers.MMDiffPipeline is MMDiffPipeline
        try:
            diffusers.NoSuchPipeline
            raise SystemExit("an unknown name resolved")
        except AttributeError as exc:
            assert "NoSuchPipeline" in str(exc)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=fresh_env(),
                          cwd=REPO, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def _build_wheel(tmp: Path) -> Path:
    """``pip wheel`` of a copy of the sources (an in-tree build would leave build/ in the checkout)."""
    source = tmp / "source"
    source.mkdir()
    for name in SOURCES:
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                           if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                    "--no-index", str(source), "-w", str(tmp / "dist")], check=True, env=fresh_env(), timeout=600)
    (wheel,) = (tmp / "dist").glob("mmdiff-*.whl")
    return wheel


def _venv_with_wheel(tmp: Path, wheel: Path) -> Path:
    """A fresh venv holding only the wheel; its dependencies (torch and the rest, already installed for
    the tests) are reached through a ``.pth`` listing this interpreter's site-packages, so no editable
    install of the checkout is seen there."""
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                  capture_output=True, text=True, check=True).stdout.strip())
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    ours |= {p for p in sys.path if p.endswith("site-packages")}
    # site-packages folders only (CI's venv lives inside the checkout, so no path filter on REPO); the
    # editable install's own .pth inside them is not run from here (only site dirs run .pth files)
    (purelib / "dependencies.pth").write_text("\n".join(sorted(p for p in ours if Path(p) != REPO)) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet", "--no-deps",
                    "--no-index", str(wheel)], check=True, env=fresh_env(), timeout=600)
    return venv


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_synthesizes_trains_and_exports(tmp_path, tiny_cache):
    wheel = _build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for required in ("mmdiff/configs/gan-tiny.yaml", "mmdiff/configs/accelerate/single_gpu.yaml",
                     "mmdiff/model_cards/pipeline.md", "mmdiff/published/mmdiff-gan/model_index.json",
                     "mmdiff/published/mmdiff-ldm/unet/diffusion_pytorch_model.safetensors",
                     "mmdiff/data/anatomy/LICENSE"):
        assert required in names, required
    venv = _venv_with_wheel(tmp_path, wheel)
    work = tmp_path / "user"  # a user's folder: no checkout in sight
    work.mkdir()
    run = lambda *args: subprocess.run([str(a) for a in args], capture_output=True, text=True,  # noqa: E731
                                       env=fresh_env(), cwd=work, timeout=600)

    done = run(venv / "bin" / "python", "-c", "import mmdiff, mmdiff.resources as r; "
               "print(mmdiff.__file__); print(r.published_pipeline('gan'))")
    assert done.returncode == 0, done.stderr
    module, published = done.stdout.split()
    assert Path(module).is_relative_to(venv) and Path(published).is_relative_to(venv), done.stdout

    t1, _, _ = blob_volume((24, 28, 6))
    nib.save(t1, work / "t1.nii.gz")
    done = run(venv / "bin" / "mmdiff", "synthesize", "--t1", "t1.nii.gz", "--engine", "gan", "--out", "synth")
    assert done.returncode == 0, done.stderr
    sidecar = (work / "synth" / "flair_synthetic.json").read_text()
    assert '"engine": "gan"' in sidecar and str(venv) in sidecar  # the packaged published pipeline ran
    assert nib.load(work / "synth" / "flair_synthetic.nii.gz").shape == (24, 28, 6)

    done = run(venv / "bin" / "mmdiff", "train", "--config", "gan-tiny", "--max-steps", "2", "--output-dir", "run",
               f"data.cache={tiny_cache}", "tracker=none")
    assert done.returncode == 0, done.stderr
    assert (work / "run" / "final" / "model_index.json").is_file()
    done = run(venv / "bin" / "mmdiff", "export", "run", "exported")
    assert done.returncode == 0, done.stderr
    assert "Trained for 2 steps" in (work / "exported" / "README.md").read_text()
