"""Shared fixtures: small synthetic volumes in each real layout, and the real BraTS sample if present."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MMDIFF_SHARED_DATA", REPO.parent / "shared" / "data"))
BRATS_SAMPLE = SHARED_DATA / "brats2018-sample"


def centred_affine(shape, spacing=(1.0, 1.0, 1.0), flip=(1, 1, 1)):
    """An axis-aligned affine whose grid is centred on world (0, 0, 0); ``flip=(-1, -1, 1)`` gives LPS."""
    affine = np.diag([s * f for s, f in zip(spacing, flip)] + [1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    return affine


def blob_volume(shape=(40, 44, 30), seed=0, scale=1000.0, affine=None):
    """A smooth ellipsoidal 'brain' with a brighter 'lesion', defined in world mm and sampled on the grid.

    The same anatomy on two grids lines up by the affines, as two sequences of one exam do.
    """
    affine = centred_affine(shape) if affine is None else affine
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    brain = (((xyz / np.array([16.0, 18.0, 12.0])) ** 2).sum(-1)) < 1
    lesion = (((xyz - np.array([5.0, 4.0, 0.0])) ** 2).sum(-1)) < 5.0 ** 2
    rng = np.random.default_rng(seed)
    data = brain * scale * (0.6 + 0.005 * xyz[..., 0]) + lesion * scale * 0.5 + rng.normal(0, scale * 0.01, shape)
    data = np.clip(data, 0, None) * brain
    return nib.Nifti1Image(data.astype(np.int16), affine), brain, lesion


def write_layout(root: Path, layout: str, n_cases: int = 2, shape=(40, 44, 30)) -> Path:
    """Write ``n_cases`` small cases in ``layout``: brats2018, brats2023, or bids (ISLES'22 style)."""
    lps = centred_affine(shape, flip=(-1, -1, 1))
    for i in range(n_cases):
        if layout == "brats2018":
            case = f"Brats18_TEST_{i:03d}_1"
            names = {"t1": "t1", "t1ce": "t1ce", "t2": "t2", "flair": "flair"}
            folder = root / case
            path = lambda s: folder / f"{case}_{s}.nii.gz"  # noqa: E731
        elif layout == "brats2023":
            case = f"BraTS-GLI-{i:05d}-000"
            names = {"t1": "t1n", "t1ce": "t1c", "t2": "t2w", "flair": "t2f"}
            folder = root / case
            path = lambda s: folder / f"{case}-{s}.nii.gz"  # noqa: E731
        elif layout == "bids":
            sub = f"sub-strokecase{i:04d}"
            base = root / "rawdata" / sub / "ses-0001"
            small = tuple(s // 2 for s in shape)
            dwi_affine = centred_affine(small, (2.0, 2.0, 2.0))
            for suffix, sc in (("dwi", 800.0), ("adc", 900.0)):
                img, _, _ = blob_volume(small, seed=i, scale=sc, affine=dwi_affine)
                (base / "dwi").mkdir(parents=True, exist_ok=True)
                nib.save(img, base / "dwi" / f"{sub}_ses-0001_{suffix}.nii.gz")
            flair_shape = (shape[0] - 4, shape[1] - 4, int(shape[2] / 1.5))  # FLAIR on its own grid, like ISLES'22
            flair_affine = centred_affine(flair_shape, (1.0, 1.0, 1.5))
            flair_affine[:3, 3] += [1.0, -1.0, 0.5]
            img, _, _ = blob_volume(flair_shape, seed=i, affine=flair_affine)
            (base / "anat").mkdir(parents=True, exist_ok=True)
            nib.save(img, base / "anat" / f"{sub}_ses-0001_FLAIR.nii.gz")
            _, _, lesion = blob_volume(small, seed=i, affine=dwi_affine)
            deriv = root / "derivatives" / sub / "ses-0001"
            deriv.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(lesion.astype(np.uint8), dwi_affine), deriv / f"{sub}_ses-0001_msk.nii.gz")
            continue
        else:
            raise ValueError(layout)
        folder.mkdir(parents=True, exist_ok=True)
        for j, suffix in enumerate(names.values()):
            img, _, lesion = blob_volume(shape, seed=10 * i + j, scale=500.0 * (j + 1), affine=lps)
            nib.save(img, path(suffix))
        nib.save(nib.Nifti1Image((lesion * (1 if layout == "brats2023" else 4)).astype(np.uint8), lps),
                 path("seg"))
    return root


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run faster on one thread, and two threads stall badly when another process holds a core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def brats_sample() -> Path:
    if not (BRATS_SAMPLE.is_dir() and any(BRATS_SAMPLE.iterdir())):
        pytest.skip(f"real BraTS sample not present at {BRATS_SAMPLE}")
    return BRATS_SAMPLE


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory):
    """The tiny configs' phantom cache (3 mm, 64 x 64), built once per session the way a fresh clone builds it."""
    from mmdiff.training import load_config
    from mmdiff.training.data import ensure_cache

    cache = tmp_path_factory.mktemp("tiny") / "cache"
    ensure_cache(load_config("gan-tiny", [f"data.cache={cache}"])["data"])
    return cache
