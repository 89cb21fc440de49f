"""NIfTI in and out: canonical orientation, write-back on the input's grid, atomic safe writes, provenance.

Reading brings a volume to the closest canonical (RAS+) orientation with nibabel; ``Volume.to_source``
undoes that exactly, so an output is written on the input's own voxel grid, affine and header.
Every write goes to a temporary file in the target folder and is renamed into place, never over a
file the caller marked as an input. A synthetic volume says so in its NIfTI ``descrip`` and in a
JSON sidecar with its provenance.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from . import __version__

SYNTHETIC_DESCRIP = "SYNTHETIC mmdiff - not acquired, not for diagnosis"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class VolumeError(ValueError):
    """A file that cannot be used as an MRI volume, with the reason."""


class OverwriteError(FileExistsError):
    """A write that would replace an input or an existing file."""


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def strip_nifti_suffix(path: str | os.PathLike) -> str:
    """``a/b.nii.gz`` -> ``a/b``."""
    s = str(path)
    for suffix in NIFTI_SUFFIXES:
        if s.lower().endswith(suffix):
            return s[: -len(suffix)]
    return s


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON sidecar that belongs to a NIfTI file (BIDS convention: same stem, ``.json``)."""
    return Path(strip_nifti_suffix(path) + ".json")


@dataclass
class Volume:
    """A 3D volume in canonical RAS+ orientation, with what is needed to write results back.

    ``data`` is float32 ``[X, Y, Z]`` (axis 2 runs inferior -> superior, so ``data[..., k]`` is an
    axial slice); ``affine`` maps its voxels to scanner mm. ``source_*`` describe the file as read.
    """

    data: np.ndarray
    affine: np.ndarray
    header: nib.Nifti1Header
    path: Path | None = None
    source_affine: np.ndarray | None = None
    source_shape: tuple[int, ...] | None = None
    nonfinite: int = 0
    _to_source: np.ndarray | None = field(default=None, repr=False)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def to_source(self, array: np.ndarray) -> np.ndarray:
        """Reorient an array on this volume's canonical grid back to the file's own voxel order."""
        if array.shape[:3] != self.data.shape:
            raise ValueError(f"array shape {array.shape[:3]} is not the volume's grid {self.data.shape}")
        if self._to_source is None:
            return array
        return nib.orientations.apply_orientation(array, self._to_source)

    def like(self, array: np.ndarray) -> Volume:
        """A volume with other voxel values on the same grid."""
        return Volume(np.asarray(array, dtype=np.float32), self.affine, self.header, None,
                      self.source_affine, self.source_shape, 0, self._to_source)


def load_volume(path: str | os.PathLike, canonical: bool = True) -> Volume:
    """Read a 3D NIfTI volume as float32 in canonical orientation.

    A 4D volume with a singleton last axis is accepted as 3D; any other 4D or higher volume is
    refused (split it first, e.g. take the b=1000 trace of a DWI series). NaN and Inf become 0 and
    are counted in ``Volume.nonfinite``.
    """
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: no such file")
    if not is_nifti(path):
        raise VolumeError(f"{path}: not a NIfTI file (expected .nii or .nii.gz)")
    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for corrupt files
        raise VolumeError(f"{path}: cannot be read as NIfTI ({exc})") from exc
    shape = img.shape
    if len(shape) not in (3, 4) or (len(shape) == 4 and shape[3] != 1):
        raise VolumeError(
            f"{path}: has shape {shape}; mmdiff needs a 3D volume (a 4D file is accepted only with "
            "a singleton last axis). Split 4D series first, e.g. keep the b=1000 trace of a DWI."
        )
    if min(img.shape) < 1:
        raise VolumeError(f"{path}: empty volume of shape {img.shape}")
    _check_image(path, img)
    if len(shape) == 4:
        img = img.slicer[..., 0]
    source_affine = img.affine.copy()
    source_shape = tuple(img.shape)
    to_source = None
    if canonical:
        src_ornt = nib.orientations.io_orientation(img.affine)
        ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
        if not np.array_equal(src_ornt, ras):
            to_source = nib.orientations.ornt_transform(ras, src_ornt)
        try:  # reorienting reads the voxels
            img = nib.as_closest_canonical(img)
        except Exception as exc:
            raise VolumeError(f"{path}: voxel data cannot be read ({exc})") from exc
    try:
        data = np.asarray(img.dataobj, dtype=np.float32)
    except MemoryError as exc:
        raise VolumeError(f"{path}: too large to read into memory ({exc}); crop or resample it first") from exc
    except Exception as exc:
        raise VolumeError(f"{path}: voxel data cannot be read ({exc})") from exc
    bad = ~np.isfinite(data)
    nonfinite = int(bad.sum())
    if nonfinite:
        data[bad] = 0.0
        warnings.warn(f"{path}: {nonfinite} NaN/Inf voxels set to 0", stacklevel=2)
    return Volume(data, img.affine.copy(), img.header.copy(), path, source_affine, source_shape,
                  nonfinite, to_source)


#: the largest volume mmdiff reads (2^28 voxels: 1 GiB as float32); a bigger declared shape is a broken header
MAX_VOXELS = 2**28
#: axial slices smaller than this (in either in-plane direction) hold no brain to work with (a 1x1x1 "volume")
MIN_INPLANE = 2


def _check_image(path: Path, img) -> None:
    """Refuse, before its voxels are read, a 3D image mmdiff cannot use: complex values, a broken
    affine, a slice too small to hold a brain, or a declared shape too large to be real."""
    dtype = img.get_data_dtype()
    if dtype.kind == "c":
        raise VolumeError(f"{path}: complex-valued voxels ({dtype}); mmdiff reads real images only: "
                          "save the magnitude (abs) as a real-valued NIfTI first")
    voxels = int(np.prod([int(n) for n in img.shape], dtype=np.float64))
    if voxels > MAX_VOXELS:
        raise VolumeError(f"{path}: the header declares shape {img.shape} ({voxels:,} voxels), more than "
                          f"mmdiff reads ({MAX_VOXELS:,}); check the header, or crop/resample the volume first")
    linear = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    finite = bool(np.isfinite(img.affine).all())
    if not finite or abs(np.linalg.det(linear)) < 1e-12:
        raise VolumeError(f"{path}: its affine (voxel-to-world matrix) is {'singular' if finite else 'not finite'}; "
                          "the header's sform/qform is broken: fix the header (e.g. nibabel set_sform) or "
                          "re-export the scan")
    axes = nib.orientations.io_orientation(img.affine)[:, 0].astype(int)
    in_plane = [int(n) for axis, n in zip(axes, img.shape) if axis in (0, 1)]
    if min(in_plane) < MIN_INPLANE:
        raise VolumeError(f"{path}: shape {img.shape} gives axial slices of {' x '.join(map(str, in_plane))} "
                          f"voxels; mmdiff needs at least {MIN_INPLANE} x {MIN_INPLANE}: pass a real brain volume")


def check_not_input(path: str | os.PathLike, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse a write target that is (or resolves to) one of the inputs."""
    target = Path(path).resolve()
    for p in inputs:
        if p is not None and Path(p).resolve() == target:
            raise OverwriteError(f"refusing to write {path}: it is an input file")


def _umask() -> int:
    """The process's umask (read by setting it and putting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, overwrite: bool = False, inputs: Iterable = ()):
    """Yield a temporary path next to ``path``; on success it is renamed onto ``path``.

    The temporary name keeps the final suffix (``.nii.gz`` etc.) so writers that pick a format from
    the name behave. Nothing is left behind on failure. The file gets the mode any writer would
    give it (0666 less the umask), not the temporary file's 0600.
    """
    path = Path(path)
    check_not_input(path, inputs)
    if path.exists() and not overwrite:
        raise OverwriteError(f"{path} exists (pass overwrite=True / --overwrite to replace it)")
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if str(path).lower().endswith(".nii.gz") else path.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary folder next to ``path``; on success it replaces ``path`` (a finished folder
    appears whole or not at all). Nothing is left behind on failure. The folder gets the mode
    ``mkdir`` would give it (0777 less the umask), not the temporary folder's 0700."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text(path: str | os.PathLike, text: str, overwrite: bool = True, inputs: Iterable = ()) -> Path:
    """Write a text file atomically."""
    with atomic_path(path, overwrite, inputs) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, overwrite: bool = True, inputs: Iterable = ()) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n",
                      overwrite, inputs)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    path: str | os.PathLike,
    header: nib.Nifti1Header | None = None,
    dtype: np.dtype | type | None = np.float32,
    descrip: str | None = None,
    overwrite: bool = False,
    inputs: Iterable = (),
    intent_name: str | None = None,
) -> Path:
    """Write a 3D array as NIfTI, atomically, never over an input or (unless asked) an existing file."""
    data = np.asarray(data)
    if dtype is not None:
        data = data.astype(dtype, copy=False)
    hdr = header.copy() if header is not None else None
    img = nib.Nifti1Image(data, affine, hdr)
    img.set_data_dtype(data.dtype)
    if np.issubdtype(data.dtype, np.floating):
        img.header.set_slope_inter(1.0, 0.0)
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    if descrip is not None:
        img.header["descrip"] = descrip.encode()[:79]
    if intent_name is not None:
        img.header.set_intent("none", name=intent_name[:15])
    with atomic_path(path, overwrite, inputs) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def provenance_record(fields: dict) -> dict:
    """A sidecar record: the caller's fields plus who made the file and when."""
    return {
        "synthetic": True,
        "warning": "Synthesized by mmdiff; not an acquired image; not for diagnosis.",
        "generator": "mmdiff",
        "mmdiff_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **fields,
    }


def is_synthetic(path: str | os.PathLike) -> bool:
    """True when a NIfTI file carries mmdiff's synthetic marker."""
    descrip = nib.load(str(path)).header["descrip"].item()
    return descrip.decode(errors="replace").startswith("SYNTHETIC")
