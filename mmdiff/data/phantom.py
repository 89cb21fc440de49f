"""Phantom cohorts: simulated brain MRI generated offline from real anatomy.

The MNI ICBM152 2009 template (T1, grey- and white-matter probability maps) gives tissue fractions;
CSF is the intracranial volume minus grey and white matter, and a skull and scalp are grown outside
it from a signed distance map. Per case the anatomy is posed and smoothly deformed, lesions are
placed (with mass effect for gliomas), tissue parameters (T1, T2, PD, ADC) are drawn around the
literature values of ``shared/PHANTOM-PHYSICS.md`` and every sequence follows from its signal
equation. Per site (cohort): field strength, protocol, voxel grid and orientation, file layout,
bias field, Rician noise level and the scanner's intensity scale.

Four cohorts mirror the datasets of the PMM-Synth paper: ``glioma`` (six sequences, BraTS 2023+
layout), ``immune`` (random subsets of T1/T2/FLAIR/ADC, thick slices, BIDS), ``bratslike`` (BraTS
2018-2021 layout, LPS, 240x240x155) and ``stroke`` (ISLES'22 BIDS, FLAIR on its own oblique grid).

Everything is deterministic: a case's random streams derive from ``(seed, cohort, index)``, and
gzip output carries no time stamp, so the same seed writes the same bytes. ``spacing`` scales
every voxel size (``spacing=3`` gives small phantoms for tests).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from ..io import OverwriteError, save_nifti
from .manifest import Case, write_manifest

ANATOMY = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
DESCRIP = "mmdiff phantom (simulated) {}"
B_VALUE = 1000.0  # s/mm^2

# Tissue parameters: (low, high) ranges. T1 per field strength in ms, T2 in ms, PD relative,
# ADC in 10^-3 mm^2/s. Normal tissue and lesion values from PHANTOM-PHYSICS.md; fat, muscle and
# post-gadolinium blood from common literature values.
TISSUES: dict[str, dict[str, tuple[float, float]]] = {
    "wm": {"t1_1.5": (650, 790), "t1_3": (830, 1080), "t2": (70, 80), "pd": (0.67, 0.71), "adc": (0.65, 0.75)},
    "gm": {"t1_1.5": (1000, 1200), "t1_3": (1300, 1800), "t2": (85, 100), "pd": (0.78, 0.82), "adc": (0.80, 0.90)},
    "csf": {"t1_1.5": (4000, 4500), "t1_3": (4000, 4400), "t2": (1500, 2000), "pd": (0.98, 1.0), "adc": (3.0, 3.2)},
    "fat": {"t1_1.5": (250, 300), "t1_3": (350, 400), "t2": (120, 160), "pd": (0.85, 0.95), "adc": (0.02, 0.06)},
    "muscle": {"t1_1.5": (950, 1100), "t1_3": (1350, 1500), "t2": (40, 50), "pd": (0.7, 0.75), "adc": (1.4, 1.6)},
    "oedema": {"t1_1.5": (1100, 1400), "t1_3": (1400, 1700), "t2": (150, 250), "pd": (0.85, 0.9), "adc": (1.2, 1.6)},
    "tumour": {"t1_1.5": (1000, 1300), "t1_3": (1300, 1600), "t2": (100, 140), "pd": (0.8, 0.85), "adc": (0.6, 0.85),
               "t1_gd": (300, 500)},
    "necrosis": {"t1_1.5": (2500, 3500), "t1_3": (2800, 3800), "t2": (400, 800), "pd": (0.93, 0.97), "adc": (2.0, 2.8)},
    "demyelination": {"t1_1.5": (900, 1200), "t1_3": (1200, 1500), "t2": (110, 160), "pd": (0.78, 0.82),
                      "adc": (0.9, 1.2)},
    "blood_gd": {"t1_1.5": (250, 400), "t1_3": (250, 400), "t2": (120, 180), "pd": (0.85, 0.9), "adc": (1.5, 2.0)},
}
# Acute infarct relative to its parent tissue: T1 +5 %, T2 +10-40 %, ADC 0.3-0.5 (absolute).
INFARCT_T2_GAIN = (1.1, 1.4)
INFARCT_ADC = (0.3, 0.5)

# Skull and scalp as layers of signed distance (mm) outside the intracranial volume: (tissue, from,
# to, fraction of the layer that is that tissue; the rest gives no signal, as cortical bone).
HEAD_LAYERS = (("csf", 0.0, 1.0, 1.0), ("bone", 1.0, 2.5, 1.0), ("fat", 2.5, 5.0, 0.5), ("bone", 5.0, 6.5, 1.0),
               ("muscle", 6.5, 8.5, 1.0), ("fat", 8.5, 12.0, 0.9), ("muscle", 12.0, 13.5, 0.8))
DWI_FAT_SUPPRESSION = 0.05

TISSUE_LABELS = {0: "outside", 1: "csf", 2: "gm", 3: "wm", 4: "lesion"}

# MNI point mapped onto a cohort's head position: the middle of the template's brain.
BRAIN_CENTRE_MNI = np.array([0.0, -17.0, 5.0])


@dataclass(frozen=True)
class GridSpec:
    """A voxel grid in world mm: voxel size, field of view, centre, and an oblique tilt (degrees, about L-R)."""

    voxel: tuple[float, float, float]
    fov: tuple[float, float, float]
    centre: tuple[float, float, float]
    tilt: float = 0.0

    def grid(self, spacing: float = 1.0) -> Grid:
        voxel = np.asarray(self.voxel, float) * spacing
        shape = tuple(max(2, int(round(f / v))) for f, v in zip(self.fov, voxel))
        t = np.deg2rad(self.tilt)
        rot = np.array([[1, 0, 0], [0, np.cos(t), -np.sin(t)], [0, np.sin(t), np.cos(t)]])
        affine = np.eye(4)
        affine[:3, :3] = rot @ np.diag(voxel)
        affine[:3, 3] = np.asarray(self.centre) - affine[:3, :3] @ ((np.array(shape) - 1) / 2)
        return Grid(shape, affine)


@dataclass(frozen=True)
class Grid:
    """A concrete voxel grid: shape and voxel-to-world affine (RAS)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def voxel(self) -> np.ndarray:
        return np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0))

    def world(self, box: tuple[slice, ...] | None = None) -> list[np.ndarray]:
        """World x, y, z of the voxel centres (of ``box``), as float32 arrays that broadcast to the box.

        An axis-aligned grid gives 1D-like arrays (cheap separable arithmetic); an oblique one full arrays.
        """
        box = box or tuple(slice(0, n) for n in self.shape)
        axes = [np.arange(s.start, s.stop, dtype=np.float32) for s in box]
        out = []
        for r in range(3):
            acc = np.float32(self.affine[r, 3])
            for a in range(3):
                if self.affine[r, a] != 0:
                    shape = [1, 1, 1]
                    shape[a] = -1
                    acc = acc + np.float32(self.affine[r, a]) * axes[a].reshape(shape)
            out.append(np.broadcast_to(acc, (1, 1, 1)) if np.ndim(acc) == 0 else acc)
        return out

    def sub(self, box: tuple[slice, ...], stride: int = 1) -> Grid:
        """The grid of the voxels in ``box``, every ``stride``-th along each axis."""
        start = np.array([s.start for s in box], float)
        affine = self.affine.copy()
        affine[:3, 3] = self.affine[:3, :3] @ start + self.affine[:3, 3]
        affine[:3, :3] = self.affine[:3, :3] * stride
        shape = tuple(-(-(s.stop - s.start) // stride) for s in box)
        return Grid(shape, affine)

    def box(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, ...] | None:
        """The voxel slices covering the world box ``[lo, hi]``, or None when it misses the grid."""
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        ijk = (np.linalg.inv(self.affine) @ corners.T)[:3]
        start = np.maximum(np.floor(ijk.min(axis=1)).astype(int), 0)
        stop = np.minimum(np.ceil(ijk.max(axis=1)).astype(int) + 1, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


@dataclass(frozen=True)
class Cohort:
    """One simulated site: what it acquires, how, on which grid, and how its files are laid out."""

    name: str
    mirrors: str
    modalities: tuple[str, ...]
    layout: str
    field: float
    t1_sequence: str  # "se" (spin echo) or "mprage"
    protocol: dict[str, dict[str, tuple[float, float]]]
    grid: GridSpec
    head: tuple[float, float, float]  # world position of BRAIN_CENTRE_MNI
    lesion: str  # "glioma", "demyelination" or "infarct"
    skull_stripped: bool
    lps: bool = False
    min_modalities: int | None = None  # draw a random subset of at least this many modalities
    own_grids: dict[str, GridSpec] = field(default_factory=dict)
    pose_sd: tuple[float, float] = (1.5, 1.5)  # rotation (deg), translation (mm)
    snr: tuple[float, float] = (20, 35)
    bias: tuple[float, float] = (0.10, 0.25)
    intensity: tuple[float, float] = (800, 1200)  # stored value of the brain's 99th percentile
    offset: float = 0.0


_PROTOCOL_3T = {
    "t1": {"TR": (2000, 2300), "TI": (950, 1100), "TE": (2.5, 4.0)},  # MPRAGE (effective TI)
    "t2": {"TR": (4000, 6000), "TE": (80, 100)},
    "flair": {"TR": (9000, 12000), "TI": (2500, 2850), "TE": (90, 140)},
    "dwi": {"TR": (4000, 6000), "TE": (55, 80)},
}
_PROTOCOL_15T = {
    "t1": {"TR": (450, 600), "TE": (10, 15)},  # spin echo
    "t2": {"TR": (4000, 6000), "TE": (90, 110)},
    "flair": {"TR": (8000, 11000), "TI": (2200, 2600), "TE": (100, 140)},
    "dwi": {"TR": (4000, 6000), "TE": (80, 100)},
}

COHORTS: dict[str, Cohort] = {
    "glioma": Cohort(
        name="glioma", mirrors="BraTS 2023+ glioma with DWI/ADC, 3 T, MPRAGE T1",
        modalities=("t1", "t2", "t1c", "flair", "dwi", "adc"), layout="brats2023", field=3.0,
        t1_sequence="mprage", protocol=_PROTOCOL_3T,
        grid=GridSpec((1.0, 1.0, 1.0), (197, 233, 189), (0.0, -18.0, 22.0)), head=tuple(BRAIN_CENTRE_MNI),
        lesion="glioma", skull_stripped=True, snr=(25, 40), bias=(0.15, 0.25), intensity=(1500, 3000)),
    "immune": Cohort(
        name="immune", mirrors="clinical immune-related (demyelinating) cohort, 1.5 T, thick slices, BIDS",
        modalities=("t1", "t2", "flair", "adc"), layout="bids", field=1.5, t1_sequence="se",
        protocol=_PROTOCOL_15T, grid=GridSpec((1.0, 1.0, 3.0), (220, 240, 174), (0.0, -12.0, 12.0)),
        head=(0.0, -14.0, 8.0), lesion="demyelination", skull_stripped=False, min_modalities=2,
        pose_sd=(4.0, 4.0), snr=(15, 25), bias=(0.10, 0.20), intensity=(300, 700), offset=12.0),
    "bratslike": Cohort(
        name="bratslike", mirrors="BraTS 2018-2021 glioma, 1.5 T spin echo, LPS 240x240x155",
        modalities=("t1", "t2", "t1c", "flair"), layout="brats2021", field=1.5, t1_sequence="se",
        protocol=_PROTOCOL_15T, grid=GridSpec((1.0, 1.0, 1.0), (240, 240, 155), (-119.5, 119.5, 77.0)),
        head=(-119.5, 119.5, 77.0), lesion="glioma", skull_stripped=True, lps=True, snr=(18, 30),
        bias=(0.10, 0.20), intensity=(400, 1200)),
    "stroke": Cohort(
        name="stroke", mirrors="ISLES'22 acute stroke, 3 T, DWI/ADC on 2 mm, FLAIR on its own oblique grid",
        modalities=("flair", "dwi", "adc"), layout="isles22", field=3.0, t1_sequence="mprage",
        protocol=_PROTOCOL_3T, grid=GridSpec((2.0, 2.0, 2.0), (220, 240, 180), (0.0, -14.0, 10.0)),
        head=(0.0, -14.0, 6.0), lesion="infarct", skull_stripped=False,
        own_grids={"flair": GridSpec((0.9, 0.9, 4.5), (230, 230, 162), (1.5, -17.0, 13.0), tilt=7.0)},
        pose_sd=(4.0, 4.0), snr=(15, 30), bias=(0.15, 0.25), intensity=(300, 1500)),
}


@dataclass
class PhantomCase:
    """One simulated exam.

    ``images`` hold every modality as stored on disk (int16 values as float32; ADC in
    10^-6 mm^2/s), RAS, all on the phantom grid ``affine`` (co-registered). A modality the site
    acquires on its own grid (stroke FLAIR) is also in ``acquired`` as ``(array, affine)``, which
    is what gets written. ``seg`` uses the cohort's own label convention (BraTS 2023: 1 necrosis,
    2 oedema, 3 enhancing; BraTS 2018-2021: 4 enhancing; immune and stroke: 1 lesion). ``tissue``
    holds each voxel's dominant compartment (``TISSUE_LABELS``); it is not written.
    """

    case_id: str
    dataset: str
    images: dict[str, np.ndarray]
    seg: np.ndarray
    affine: np.ndarray
    brain_mask: np.ndarray
    tissue: np.ndarray | None = None
    acquired: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    params: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Template:
    """The 1 mm template maps (gm, wm, signed distance to the intracranial surface, enhancing
    vessels) plus lesion-centre candidates in MNI mm."""

    maps: dict[str, np.ndarray]
    affine: np.ndarray
    candidates: dict[str, np.ndarray]
    ventricle_centre: np.ndarray


def _anatomy_path(kind: str) -> Path:
    return Path(str(resources.files("mmdiff.data") / "anatomy" / ANATOMY.format(kind)))


@lru_cache(maxsize=1)
def _template() -> _Template:
    """Load the template once and derive the intracranial volume, CSF, vessels and candidates."""
    img = nib.load(_anatomy_path("t1"))
    t1 = np.asarray(img.dataobj)
    gm = np.asarray(nib.load(_anatomy_path("gm")).dataobj, dtype=np.float32) / 255
    wm = np.asarray(nib.load(_anatomy_path("wm")).dataobj, dtype=np.float32) / 255
    affine = img.affine.copy()

    # Intracranial volume: the brain-masked template, filled, grown 2 mm for extra-axial CSF.
    icv = ndi.binary_fill_holes(t1 > 0)
    icv = ndi.binary_dilation(icv, ndi.generate_binary_structure(3, 1), iterations=2)
    sd = _signed_distance(icv)
    scale = np.minimum(1.0, np.clip(0.5 - sd, 0, 1) / np.maximum(gm + wm, 1e-6))
    gm, wm = gm * scale, wm * scale
    csf = np.clip(0.5 - sd, 0, 1) - gm - wm

    x, y, z = (np.arange(n, dtype=np.float32) * affine[i, i] + affine[i, 3] for i, n in enumerate(t1.shape))
    X, Y, Z = x[:, None, None], y[None, :, None], z[None, None, :]
    ventricles = (csf > 0.6) & (sd < -12) & (np.abs(X) < 30) & (Z > -25) & (Z < 40) & (Y > -60) & (Y < 30)
    labels, n = ndi.label(ventricles)
    sizes = ndi.sum(ventricles, labels, range(1, n + 1))
    ventricles = np.isin(labels, 1 + np.argsort(sizes)[-2:])

    # Normally enhancing structures for T1C: dura, superior sagittal sinus, choroid plexus glomus.
    dura = 0.35 * np.exp(-(((sd - 0.8) / 0.8) ** 2))
    sinus = 0.9 * ((np.abs(X) < 4.5) & (sd > -2.0) & (sd < 2.5) & (Z > 0))
    glomus = (ndi.binary_erosion(ventricles) & (Y > -48) & (Y < -22) & (np.abs(X) > 14) & (np.abs(X) < 34)
              & (Z > 2) & (Z < 24))
    vessel = np.maximum(dura, np.maximum(sinus, 0.8 * glomus)).astype(np.float32)

    maps = {"gm": gm.astype(np.float32), "wm": wm.astype(np.float32), "sd": sd, "vessel": vessel}

    # Lesion-centre candidates on a 2 mm lattice.
    sub = (slice(None, None, 2),) * 3
    g, w, d = gm[sub], wm[sub], sd[sub]
    Xs, Ys, Zs = X[sub], Y[sub], Z[sub]
    vent = ventricles[sub]
    near_vent = ndi.binary_dilation(vent, iterations=3) & ~ndi.binary_dilation(vent, iterations=1)
    mni = lambda m: np.stack([np.broadcast_to(a, m.shape)[m] for a in (Xs, Ys, Zs)], axis=1)  # noqa: E731
    par = g + w > 0.8
    ax = np.abs(Xs)
    candidates = {
        "glioma": mni((w > 0.9) & (d < -14) & (Zs > -5) & (ax > 12) & ~near_vent),
        "periventricular": mni((w > 0.6) & near_vent),
        "deep_wm": mni((w > 0.9) & (d < -10) & (Zs > -35)),
        "juxtacortical": mni((w > 0.4) & (g > 0.3) & (d < -3) & (d > -14) & (Zs > -20)),
        "mca": mni(par & (ax > 30) & (ax < 55) & (Ys > -50) & (Ys < 25) & (Zs > -5) & (Zs < 45) & (d < -8) & (d > -26)),
        "aca": mni(par & (ax > 3) & (ax < 15) & (Ys > -25) & (Ys < 45) & (Zs > 20) & (Zs < 60) & (d < -5) & (d > -20)),
        "pca": mni(par & (ax > 5) & (ax < 35) & (Ys < -65) & (Zs > -10) & (Zs < 20) & (d < -5) & (d > -20)),
        "lacunar": mni(par & (ax > 12) & (ax < 28) & (Ys > -25) & (Ys < 15) & (Zs > -5) & (Zs < 22) & (d < -25)),
    }
    ventricle_centre = mni(vent).mean(axis=0)
    return _Template(maps, affine, candidates, ventricle_centre)


def _signed_distance(mask: np.ndarray) -> np.ndarray:
    """Signed distance (mm, negative inside) to the surface of a 1 mm mask, computed on a 2 mm grid
    (with sub-voxel surface positions from the 2 mm occupancy) and interpolated back to 1 mm."""
    open_below = 16  # the template stops at the brainstem: continue the head downwards, do not close it
    pad = [(0, mask.shape[0] % 2), (0, mask.shape[1] % 2), (open_below, mask.shape[2] % 2)]
    m = np.pad(mask.astype(np.float32), pad, mode="edge")
    frac = m.reshape(m.shape[0] // 2, 2, m.shape[1] // 2, 2, m.shape[2] // 2, 2).mean(axis=(1, 3, 5))
    inside = frac > 0.5
    sd = ndi.distance_transform_edt(~inside) - ndi.distance_transform_edt(inside)
    sd = 2 * (sd - 0.5 * np.sign(sd))  # mm; the surface lies half a voxel beyond the last voxel centre
    border = np.abs(sd) <= 1.01
    sd[border] = 2 * (0.5 - frac[border])
    sd = sd.astype(np.float32)
    for axis in range(3):  # linear 2x upsampling: 2 mm voxel k covers 1 mm voxels 2k and 2k+1
        a = np.moveaxis(sd, axis, 0)
        prev = np.concatenate([a[:1], a[:-1]])
        nxt = np.concatenate([a[1:], a[-1:]])
        up = np.empty((2 * a.shape[0], *a.shape[1:]), np.float32)
        up[0::2] = 0.75 * a + 0.25 * prev
        up[1::2] = 0.75 * a + 0.25 * nxt
        sd = np.moveaxis(up, 0, axis)
    return np.ascontiguousarray(sd[: mask.shape[0], : mask.shape[1], open_below: open_below + mask.shape[2]])


@lru_cache(maxsize=8)
def _pooled(pool: tuple[int, int, int], sigma: tuple[float, float, float]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Template maps averaged over ``pool`` voxel blocks and blurred by ``sigma`` (pooled voxels): a
    slice profile for coarse grids, so that partial volume stays right."""
    tpl = _template()
    out = {}
    for key, arr in tpl.maps.items():
        crop = tuple(slice(0, (n // p) * p) for n, p in zip(arr.shape, pool))
        a = arr[crop]
        a = a.reshape(a.shape[0] // pool[0], pool[0], a.shape[1] // pool[1], pool[1],
                      a.shape[2] // pool[2], pool[2]).mean(axis=(1, 3, 5))
        if any(s > 0 for s in sigma):
            a = ndi.gaussian_filter(a, sigma)
        out[key] = a.astype(np.float32)
    affine = tpl.affine.copy()
    affine[:3, :3] = tpl.affine[:3, :3] @ np.diag(pool)
    affine[:3, 3] = tpl.affine[:3, 3] + tpl.affine[:3, :3] @ ((np.array(pool) - 1) / 2)
    return out, affine


# ------------------------------------------------------------------------------------ random fields


class _SmoothField:
    """A smooth random scalar field over world mm with values in [-1, 1]: a weighted sum of
    separable products of cosines (cheap to evaluate on axis-aligned grids)."""

    def __init__(self, rng: np.random.Generator, wavelength: tuple[float, float], terms: int = 3):
        self.k = (2 * np.pi / rng.uniform(*wavelength, size=(terms, 3))).astype(np.float32)
        self.phase = rng.uniform(0, 2 * np.pi, size=(terms, 3)).astype(np.float32)
        w = rng.normal(size=terms)
        self.w = (w / np.abs(w).sum()).astype(np.float32)

    def __call__(self, xyz: list[np.ndarray]) -> np.ndarray:
        out = 0
        for t in range(len(self.w)):
            term = self.w[t]
            for a in range(3):
                term = term * np.cos(self.k[t, a] * xyz[a] + self.phase[t, a])
            out = out + term
        return out


@dataclass
class _Blob:
    """An irregular ellipsoidal region in world mm: an ellipsoid whose surface is perturbed by
    smooth noise. ``fraction`` gives its partial-volume occupancy on any grid."""

    centre: np.ndarray
    axes: np.ndarray
    rotation: np.ndarray
    roughness: float  # mm of surface perturbation
    noise: np.ndarray  # smooth unit noise on a small lattice around the centre
    step: float

    @classmethod
    def make(cls, rng, centre, axes, roughness, rotation=None) -> _Blob:
        axes = np.asarray(axes, float)
        if rotation is None:
            q = rng.normal(size=4)
            q /= np.linalg.norm(q)
            a, b, c, d = q
            rotation = np.array([[a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                                 [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
                                 [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])
        step = max(1.5, axes.mean() / 3)
        n = int(np.ceil(2 * (axes.max() + 2 * roughness + 4) / step)) + 3
        noise = ndi.gaussian_filter(rng.normal(size=(n, n, n)), 1.0)
        noise = np.clip(noise / noise.std(), -2, 2).astype(np.float32)
        return cls(np.asarray(centre, float), axes, rotation, roughness, noise, step)

    @property
    def reach(self) -> float:
        return self.axes.max() + 2 * self.roughness + 4

    def level(self, xyz: list[np.ndarray]) -> np.ndarray:
        """Approximate signed depth inside the surface (mm): positive inside."""
        rel = [xyz[a] - np.float32(self.centre[a]) for a in range(3)]
        rho2 = 0
        for r in range(3):
            u = sum(np.float32(self.rotation[a, r]) * rel[a] for a in range(3)) / np.float32(self.axes[r])
            rho2 = rho2 + u * u
        n = self.noise.shape[0]
        coords = [np.broadcast_to(rel[a] / self.step + (n - 1) / 2, np.broadcast_shapes(*[r.shape for r in rel]))
                  for a in range(3)]
        noise = ndi.map_coordinates(self.noise, coords, order=1, mode="nearest", output=np.float32)
        return np.float32(self.axes.mean()) * (1 - np.sqrt(rho2)) + np.float32(self.roughness) * noise

    def grid_level(self, grid: Grid) -> np.ndarray:
        """:meth:`level` on every voxel of ``grid`` (computed near the blob, ``-reach`` elsewhere)."""
        out = np.full(grid.shape, -self.reach, np.float32)
        box = grid.box(self.centre - self.reach, self.centre + self.reach)
        if box is not None:
            out[box] = self.level(grid.world(box))
        return out

    def fraction(self, grid: Grid, edge: float) -> np.ndarray:
        """Occupancy in [0, 1] on ``grid`` (ramp of width ``edge`` mm across the surface)."""
        return _ramp(self.grid_level(grid), edge)


def _ramp(level: np.ndarray, edge: float) -> np.ndarray:
    """Partial-volume occupancy from a signed depth (mm, positive inside): a linear ramp ``edge`` wide."""
    return np.clip(0.5 + level / np.float32(edge), 0, 1)


# ------------------------------------------------------------------------------------------ physics


def _signal(seq: str, p: dict, prot: dict, post: bool = False) -> float:
    """Magnitude signal of one tissue (parameters ``p``) for one sequence."""
    t1 = p["t1_gd"] if post and "t1_gd" in p else p["t1"]
    TR, TE = prot["TR"], prot["TE"]
    if seq == "se":
        return p["pd"] * (1 - np.exp(-TR / t1)) * np.exp(-TE / p["t2"])
    if seq == "ir":
        return p["pd"] * abs(1 - 2 * np.exp(-prot["TI"] / t1) + np.exp(-TR / t1)) * np.exp(-TE / p["t2"])
    raise ValueError(seq)


def _draw_tissues(rng: np.random.Generator, field_t: float) -> dict[str, dict[str, float]]:
    key = "t1_3" if field_t >= 2 else "t1_1.5"
    out = {}
    for name, ranges in TISSUES.items():
        p = {"t1": rng.uniform(*ranges[key]), "t2": rng.uniform(*ranges["t2"]), "pd": rng.uniform(*ranges["pd"]),
             "adc": rng.uniform(*ranges["adc"])}
        if "t1_gd" in ranges:
            p["t1_gd"] = rng.uniform(*ranges["t1_gd"])
        out[name] = p
    out["bone"] = {"t1": 500.0, "t2": 1.0, "pd": 0.0, "adc": 0.0}
    out["vessel"] = {**out["gm"], "t1_gd": out["blood_gd"]["t1"]}
    return out


def _draw_protocol(rng: np.random.Generator, cohort: Cohort, csf_t1: float) -> dict[str, dict[str, float]]:
    """Sequence parameters within the site's ranges; FLAIR's TI is tuned to null the site's CSF."""
    prot = {}
    for seq, ranges in cohort.protocol.items():
        prot[seq] = {k: float(rng.uniform(*r)) for k, r in ranges.items()}
    fl = prot["flair"]
    ti_null = csf_t1 * np.log(2 / (1 + np.exp(-fl["TR"] / csf_t1)))
    fl["TI"] = float(np.clip(ti_null * rng.uniform(0.98, 1.02), *cohort.protocol["flair"]["TI"]))
    prot["dwi"]["b"] = B_VALUE
    return prot


# ------------------------------------------------------------------------------------- simulation


@dataclass
class _Pose:
    """World <- MNI mapping of one case: ``world = A @ mni + b``, plus a smooth displacement (mm)
    and an optional radial mass effect around a lesion."""

    A: np.ndarray
    b: np.ndarray
    warp: list[_SmoothField]
    warp_mm: float
    mass_centre: np.ndarray | None = None
    mass_strength: float = 0.0
    mass_radius: float = 1.0

    def to_world(self, mni: np.ndarray) -> np.ndarray:
        return mni @ self.A.T + self.b

    def template_coords(self, grid: Grid, tpl_affine: np.ndarray) -> np.ndarray:
        """Template voxel coordinates (3, *grid.shape) that every grid voxel samples."""
        xyz = grid.world()
        disp = [np.float32(self.warp_mm) * f(xyz) for f in self.warp]
        if self.mass_centre is not None:
            rel = [xyz[a] - np.float32(self.mass_centre[a]) for a in range(3)]
            r2 = rel[0] ** 2 + rel[1] ** 2 + rel[2] ** 2
            k = 1 - np.float32(self.mass_strength) * np.exp(-r2 / np.float32(2 * self.mass_radius ** 2))
            xyz = [np.float32(self.mass_centre[a]) + rel[a] * k for a in range(3)]
        ainv = np.linalg.inv(self.A)
        to_vox = np.linalg.inv(tpl_affine)
        m = (to_vox[:3, :3] @ ainv).astype(np.float32)
        c = (to_vox[:3, :3] @ (-ainv @ self.b) + to_vox[:3, 3]).astype(np.float32)
        out = np.empty((3, *grid.shape), np.float32)
        for r in range(3):
            acc = c[r] + sum(np.float32(to_vox[r, a]) * disp[a] for a in range(3))
            for a in range(3):
                acc = acc + m[r, a] * xyz[a]
            out[r] = acc
        return out


def _draw_pose(rng: np.random.Generator, cohort: Cohort) -> _Pose:
    rot_sd, shift_sd = cohort.pose_sd
    angles = np.deg2rad(rng.normal(0, rot_sd, 3))
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    scale = np.clip(rng.normal(1.0, 0.03, 3), 0.93, 1.05)
    A = rz @ ry @ rx @ np.diag(scale)
    b = np.asarray(cohort.head) + rng.normal(0, shift_sd, 3) - A @ BRAIN_CENTRE_MNI
    warp = [_SmoothField(rng, (60, 160)) for _ in range(3)]
    return _Pose(A, b, warp, float(rng.uniform(2.0, 4.0)))


def _brain_box(grid: Grid, pose: _Pose, stride: int = 4) -> tuple[slice, ...]:
    """The voxels of ``grid`` that can hold intracranial tissue, found on a coarse probe."""
    maps, tpl_affine = _pooled((1, 1, 1), (0.0, 0.0, 0.0))
    coarse = grid.sub(tuple(slice(0, n) for n in grid.shape), stride)
    sd = ndi.map_coordinates(maps["sd"], pose.template_coords(coarse, tpl_affine), order=1, mode="constant",
                             cval=50.0, output=np.float32)
    inside = np.argwhere(sd < stride * grid.voxel.max() + 2)
    if len(inside) == 0:
        raise RuntimeError("the phantom's brain lies outside its grid")
    lo = np.maximum((inside.min(axis=0) - 1) * stride, 0)
    hi = np.minimum((inside.max(axis=0) + 2) * stride, grid.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _paste(array: np.ndarray, box: tuple[slice, ...], shape: tuple[int, ...]) -> np.ndarray:
    out = np.zeros(shape, array.dtype)
    out[box] = array
    return out


def _hemisphere(coords: np.ndarray, tpl_affine: np.ndarray, side: float) -> np.ndarray:
    """1 in the cerebral hemisphere on ``side`` (sign of MNI x), 0 across the midline and below the
    tentorium (cerebellum, brainstem); from template voxel coordinates."""
    x, y, z = (np.float32(tpl_affine[r, r]) * coords[r] + np.float32(tpl_affine[r, 3]) for r in range(3))
    tentorium = -5 + 0.2 * (y + 60) - 0.15 * np.abs(x)
    infra = ((y < -40) & (z < tentorium)) | ((z < -20) & (np.abs(x) < 15))
    return (~infra & (np.float32(side) * x > 1.0)).astype(np.float32)


def _pick(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
    return points[rng.integers(len(points))] + rng.uniform(-1, 1, 3)


def _draw_lesions(rng: np.random.Generator, cohort: Cohort, pose: _Pose) -> dict:
    """Lesion geometry in world mm for the cohort's disease (a glioma also sets ``pose``'s mass effect)."""
    tpl = _template()
    if cohort.lesion == "glioma":
        centre = pose.to_world(_pick(rng, tpl.candidates["glioma"]))
        r_core = rng.uniform(8, 20)
        core = _Blob.make(rng, centre, r_core * rng.uniform(0.8, 1.2, 3), roughness=0.25 * r_core)
        nec_r = r_core * rng.uniform(0.3, 0.8)
        necrosis = _Blob.make(rng, centre + rng.normal(0, 0.08 * r_core, 3), nec_r * rng.uniform(0.85, 1.15, 3),
                              roughness=0.2 * nec_r)
        r_ed = r_core * rng.uniform(1.4, 2.2)
        oedema = _Blob.make(rng, centre + rng.normal(0, 0.15 * r_core, 3), r_ed * rng.uniform(0.8, 1.2, 3),
                            roughness=0.35 * r_ed)
        pose.mass_centre, pose.mass_strength, pose.mass_radius = centre, rng.uniform(0.25, 0.5), 1.2 * r_core
        return {"core": core, "necrosis": necrosis, "oedema": oedema, "rim": rng.uniform(1.5, 5.0),
                "oedema_edge": rng.uniform(6.0, 12.0), "oedema_max": rng.uniform(0.6, 0.95)}
    if cohort.lesion == "demyelination":
        blobs = []
        for _ in range(rng.integers(4, 19)):
            kind = rng.choice(["periventricular", "deep_wm", "juxtacortical"], p=[0.5, 0.3, 0.2])
            mni = _pick(rng, tpl.candidates[kind])
            if kind == "periventricular":  # ovoid, long axis pointing away from the ventricles
                u = mni - tpl.ventricle_centre
                u /= np.linalg.norm(u)
                v = np.cross(u, [0.0, 0.0, 1.0] if abs(u[2]) < 0.9 else [1.0, 0.0, 0.0])
                v /= np.linalg.norm(v)
                rotation = pose.A @ np.stack([u, v, np.cross(u, v)], axis=1)
                rotation /= np.linalg.norm(rotation, axis=0)
                axes = [rng.uniform(4, 10), rng.uniform(2, 4), rng.uniform(2, 4)]
            else:
                rotation, axes = None, rng.uniform(2, 6, 3)
            blobs.append(_Blob.make(rng, pose.to_world(mni), axes, roughness=0.15 * np.mean(axes),
                                    rotation=rotation))
        return {"plaques": blobs}
    if cohort.lesion == "infarct":
        territory = rng.choice(["mca", "aca", "pca", "lacunar"], p=[0.55, 0.12, 0.15, 0.18])
        mni = _pick(rng, tpl.candidates[territory])
        r = rng.uniform(4, 8) if territory == "lacunar" else rng.uniform(10, 28)
        blobs = [_Blob.make(rng, pose.to_world(mni), r * rng.uniform(0.6, 1.3, 3), roughness=0.35 * r)]
        for _ in range(rng.integers(0, 4) if territory != "lacunar" else 0):  # scattered emboli
            near = mni + rng.normal(0, 12, 3)
            near[0] = abs(near[0]) * np.sign(mni[0])
            blobs.append(_Blob.make(rng, pose.to_world(near), rng.uniform(2, 4.5, 3), roughness=1.0))
        return {"infarcts": blobs, "territory": str(territory), "side": float(np.sign(mni[0]) or 1.0)}
    raise ValueError(cohort.lesion)


@dataclass
class _Tissue:
    """Compartment fractions on one grid: name -> (fraction map, parameter dict)."""

    parts: dict[str, tuple[np.ndarray, dict]]
    icv: np.ndarray
    vessel: tuple[np.ndarray, dict] | None  # normally enhancing structures (T1C only)
    seg: np.ndarray

    def labels(self) -> np.ndarray:
        """The dominant compartment of each intracranial voxel (see ``TISSUE_LABELS``)."""
        lesion = sum(f for k, (f, _) in self.parts.items() if k not in ("gm", "wm", "csf", "fat", "muscle"))
        stack = np.stack([self.parts["csf"][0], self.parts["gm"][0], self.parts["wm"][0], lesion])
        return ((np.argmax(stack, axis=0) + 1) * (self.icv > 0.5)).astype(np.uint8)


def _tissue(grid: Grid, cohort: Cohort, pose: _Pose, lesions: dict, params: dict, shell: _SmoothField,
            want_vessel: bool) -> _Tissue:
    """Sample the deformed anatomy on ``grid`` and insert the lesions."""
    voxel = grid.voxel
    pool = tuple(max(1, int(np.floor(v + 1e-6))) for v in voxel)
    sigma = tuple(round(float(np.sqrt(max(0.0, v * v - p * p) / 12) / p), 2) for v, p in zip(voxel, pool))
    maps, tpl_affine = _pooled(pool, sigma)
    coords = pose.template_coords(grid, tpl_affine)
    sample = lambda key, cval: ndi.map_coordinates(maps[key], coords, order=1, mode="constant",  # noqa: E731
                                                   cval=cval, output=np.float32)
    gm, wm = sample("gm", 0.0), sample("wm", 0.0)
    sd = sample("sd", 50.0)
    vessel = (sample("vessel", 0.0), params["vessel"]) if want_vessel else None
    territory = _hemisphere(coords, tpl_affine, lesions["side"]) if cohort.lesion == "infarct" else None
    del coords
    edge = float(max(1.0, np.cbrt(np.prod(voxel))))
    icv = _ramp(-sd, edge)
    csf = np.maximum(icv - gm - wm, 0)
    parts: dict[str, tuple[np.ndarray, dict]] = {}
    seg = np.zeros(grid.shape, np.uint8)

    if cohort.lesion == "glioma":
        core_level = lesions["core"].grid_level(grid)
        core = _ramp(core_level, edge)
        # necrosis stays inside an enhancing rim of at least ``rim`` mm
        nec = _ramp(np.minimum(lesions["necrosis"].grid_level(grid), core_level - lesions["rim"]), edge)
        keep = 1 - core
        gm, wm, csf = gm * keep, wm * keep, csf * keep
        # vasogenic oedema spreads in white matter, fading out over a few mm
        ed_level = lesions["oedema"].grid_level(grid)
        ed = lesions["oedema_max"] * _ramp(ed_level, lesions["oedema_edge"])
        ed_wm, ed_gm = ed * wm, 0.1 * ed * gm
        gm, wm = gm - ed_gm, wm - ed_wm
        parts["necrosis"] = (nec * icv, params["necrosis"])
        parts["tumour"] = ((core - nec) * icv, params["tumour"])
        parts["oedema"] = (ed_wm + ed_gm, params["oedema"])
        enh_label = 4 if cohort.layout == "brats2021" else 3
        in_brain = icv > 0.5
        seg[(ed_level > 0) & (keep > 0.5) & (gm + wm + ed_wm + ed_gm > 0.5) & in_brain] = 2
        seg[(core > 0.5) & in_brain] = enh_label
        seg[(nec > 0.5) & (core > 0.5) & in_brain] = 1
    elif cohort.lesion == "demyelination":
        les = np.zeros(grid.shape, np.float32)
        for blob in lesions["plaques"]:
            np.maximum(les, blob.fraction(grid, edge), out=les)
        from_wm, from_gm = les * wm, 0.25 * les * gm
        gm, wm = gm - from_gm, wm - from_wm
        parts["demyelination"] = (from_wm + from_gm, params["demyelination"])
        seg[(les > 0.5) & (from_wm + from_gm > 0.3)] = 1
    elif cohort.lesion == "infarct":
        les = np.zeros(grid.shape, np.float32)  # geometric extent
        dead = np.zeros(grid.shape, np.float32)  # infarcted share of the tissue: full in the core, partial at the rim
        for blob in lesions["infarcts"]:
            level = blob.grid_level(grid)
            frac = _ramp(level, edge)
            np.maximum(les, frac, out=les)
            np.maximum(dead, frac * (0.5 + 0.5 * _ramp(level - 4.0, 8.0)), out=dead)
        les *= territory  # one hemisphere, above the tentorium
        dead *= territory
        i_gm, i_wm = dead * gm, dead * wm
        gm, wm = gm - i_gm, wm - i_wm
        parts["infarct_gm"] = (i_gm, params["infarct_gm"])
        parts["infarct_wm"] = (i_wm, params["infarct_wm"])
        seg[(les > 0.5) & (i_gm + i_wm > 0.5)] = 1

    parts = {"gm": (gm, params["gm"]), "wm": (wm, params["wm"]), "csf": (csf, params["csf"]), **parts}
    if not cohort.skull_stripped:  # skull and scalp as layers outside the intracranial volume
        depth = sd - 2.0 * shell(grid.world())
        below = lambda t: _ramp(t - depth, edge)  # noqa: E731
        for name, lo, hi, share in HEAD_LAYERS:
            if name == "bone":
                continue
            frac = np.clip(below(hi) - below(lo), 0, 1) * np.float32(share) * (1 - icv)
            prev = parts.get(name, (0, params[name]))[0]
            parts[name] = (prev + frac, params[name])
    return _Tissue(parts, icv, vessel, seg)


def _render(tissue: _Tissue, seq: str, prot: dict, cohort: Cohort) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Noise-free signal of one modality (DWI gives ``(S0, S_b)``)."""
    if seq in ("t1", "t1c"):
        kind, p = ("ir", prot["t1"]) if cohort.t1_sequence == "mprage" else ("se", prot["t1"])
        post = seq == "t1c"
        out = sum(f * np.float32(_signal(kind, par, p, post)) for f, par in tissue.parts.values())
        if post and tissue.vessel is not None:  # normally enhancing vessels, dura, choroid plexus
            v, par = tissue.vessel
            v = v * tissue.icv if cohort.skull_stripped else v
            out = out * (1 - v) + v * np.float32(_signal(kind, par, p, post))
        return out
    if seq == "t2":
        return sum(f * np.float32(_signal("se", par, prot["t2"])) for f, par in tissue.parts.values())
    if seq == "flair":
        return sum(f * np.float32(_signal("ir", par, prot["flair"])) for f, par in tissue.parts.values())
    if seq == "dwi":
        s0 = np.zeros(tissue.icv.shape, np.float32)
        sb = np.zeros(tissue.icv.shape, np.float32)
        for name, (f, par) in tissue.parts.items():
            base = _signal("se", par, prot["dwi"]) * (DWI_FAT_SUPPRESSION if name == "fat" else 1.0)
            s0 += f * np.float32(base)
            sb += f * np.float32(base * np.exp(-prot["dwi"]["b"] * par["adc"] * 1e-3))
        return s0, sb
    raise ValueError(seq)


def _rician(rng: np.random.Generator, signal: np.ndarray, sigma: float) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of standard deviation ``sigma`` per channel."""
    sigma = np.float32(sigma)
    re = rng.standard_normal(signal.shape, dtype=np.float32)
    re *= sigma
    re += signal
    re *= re
    im = rng.standard_normal(signal.shape, dtype=np.float32)
    im *= sigma
    im *= im
    re += im
    return np.sqrt(re, out=re)


def _p99(values: np.ndarray, mask: np.ndarray) -> float:
    sel = values[mask]
    return float(np.percentile(sel[:: max(1, sel.size // 200_000)], 99)) if sel.size else 1.0


@dataclass
class _Site:
    """Per-case draws that turn signals into stored values: bias fields, SNR, scale."""

    bias: _SmoothField
    bias_amp: float
    extra: dict[str, _SmoothField]
    snr: dict[str, float]
    target: dict[str, float]


def _acquire(rng: np.random.Generator, grid: Grid, tissue: _Tissue, modalities: list[str], prot: dict,
             cohort: Cohort, site: _Site) -> dict[str, np.ndarray]:
    """Bias, Rician noise and the scanner's scale for ``modalities`` on one grid (stored values).

    DWI and ADC come from one noisy b=0 / b=1000 pair: ``ADC = ln(S0 / S_b) / b``, so the bias
    cancels in ADC and partial volume and noise behave as in a real fit.
    """
    xyz = grid.world()
    log_bias = np.float32(site.bias_amp) * site.bias(xyz)
    brain = tissue.icv > 0.5
    out = {}
    for seq in ("t1", "t2", "t1c", "flair", "dwi"):
        if seq not in modalities and not (seq == "dwi" and "adc" in modalities):
            continue
        bias = np.exp(log_bias + np.float32(0.03) * site.extra[seq](xyz))
        if seq == "dwi":
            s0, sb = _render(tissue, seq, prot, cohort)
            sigma = float(s0[brain].mean()) / site.snr[seq]
            s0n, signal = _rician(rng, s0 * bias, sigma), _rician(rng, sb * bias, sigma)
            if "adc" in modalities:
                adc = np.log(np.maximum(s0n, 1e-6) / np.maximum(signal, 1e-6)) / np.float32(prot["dwi"]["b"])
                valid = (s0n > 4 * sigma) & (s0 > 2 * sigma)
                out["adc"] = np.round(np.clip(adc * 1e6, 0, 4000) * valid)
            if seq not in modalities:
                continue
        else:
            signal = _render(tissue, seq, prot, cohort)
            sigma = float(signal[brain].mean()) / site.snr[seq]
            signal = _rician(rng, signal * bias, sigma)
        scale = site.target[seq] / _p99(signal, brain)
        out[seq] = np.round(signal * np.float32(scale) + np.float32(cohort.offset))
    if cohort.skull_stripped:
        out = {k: v * brain for k, v in out.items()}
    return {k: np.clip(v, -32768, 32767).astype(np.float32) for k, v in out.items()}


def case_id(cohort: str, index: int) -> str:
    """The case identifier in the cohort's naming scheme (``index`` counts from 0); BIDS cohorts use
    ``sub-<label>_ses-<label>`` as mmdiff's BIDS reader does."""
    n = index + 1
    return {"glioma": f"PhantomGLI-{n:05d}-000", "immune": f"sub-immune{n:04d}_ses-01",
            "bratslike": f"BraTS2021_{n:05d}", "stroke": f"sub-strokecase{n:04d}_ses-0001"}[cohort]


def _rngs(seed: int, cohort: str, index: int) -> list[np.random.Generator]:
    ss = np.random.SeedSequence([int(seed), zlib.crc32(cohort.encode()), int(index)])
    return [np.random.default_rng(s) for s in ss.spawn(5)]


def simulate_case(cohort: str, index: int, seed: int = 0, spacing: float = 1.0) -> PhantomCase:
    """Simulate case ``index`` of ``cohort``; the same arguments give the same arrays.

    ``spacing`` scales every voxel size of the site's grids (1 = the site's own resolution).
    """
    if cohort not in COHORTS:
        raise KeyError(f"unknown phantom cohort {cohort!r}: known are {', '.join(COHORTS)}")
    if spacing <= 0:
        raise ValueError(f"spacing must be positive, got {spacing}")
    c = COHORTS[cohort]
    r_proto, r_pose, r_lesion, r_site, r_noise = _rngs(seed, cohort, index)

    # Which sequences, which tissue values, which protocol.
    modalities = list(c.modalities)
    if c.min_modalities is not None:
        k = int(r_proto.integers(c.min_modalities, len(modalities) + 1))
        chosen = set(r_proto.choice(modalities, size=k, replace=False))
        modalities = [m for m in c.modalities if m in chosen]
    params = _draw_tissues(r_proto, c.field)
    for name in ("gm", "wm"):
        p = params[name]
        params[f"infarct_{name}"] = {**p, "t1": p["t1"] * 1.05, "t2": p["t2"] * r_proto.uniform(*INFARCT_T2_GAIN),
                                     "adc": r_proto.uniform(*INFARCT_ADC)}
    csf_nominal = np.mean(TISSUES["csf"]["t1_3" if c.field >= 2 else "t1_1.5"])
    prot = _draw_protocol(r_proto, c, csf_nominal)

    pose = _draw_pose(r_pose, c)
    shell = _SmoothField(r_pose, (40, 120))
    lesions = _draw_lesions(r_lesion, c, pose)

    site = _Site(bias=_SmoothField(r_site, (150, 400)), bias_amp=float(np.log1p(r_site.uniform(*c.bias)) / 0.6),
                 extra={s: _SmoothField(r_site, (100, 300), terms=1) for s in ("t1", "t2", "t1c", "flair", "dwi")},
                 snr={s: float(r_site.uniform(*c.snr)) for s in ("t1", "t2", "t1c", "flair", "dwi")},
                 target={s: float(r_site.uniform(*c.intensity)) for s in ("t1", "t2", "t1c", "flair", "dwi")})

    grid = c.grid.grid(spacing)
    box = _brain_box(grid, pose) if c.skull_stripped else tuple(slice(0, n) for n in grid.shape)
    want_vessel = "t1c" in modalities
    tissue = _tissue(grid.sub(box), c, pose, lesions, params, shell, want_vessel)
    images = _acquire(r_noise, grid.sub(box), tissue, modalities, prot, c, site)
    acquired = {}
    for m, spec in c.own_grids.items():
        if m in modalities:
            own = spec.grid(spacing)
            t_own = _tissue(own, c, pose, lesions, params, shell, want_vessel)
            acquired[m] = (_acquire(r_noise, own, t_own, [m], prot, c, site)[m], own.affine)
    summary = {"protocol": prot, "field_T": c.field, "tissues": {k: dict(v) for k, v in params.items()},
               "lesion_voxels": int((tissue.seg > 0).sum()), "spacing": spacing, "seed": seed, "index": index}
    if "territory" in lesions:
        summary["territory"] = lesions["territory"]
    return PhantomCase(case_id=case_id(cohort, index), dataset=cohort,
                       images={m: _paste(images[m], box, grid.shape) for m in c.modalities if m in modalities},
                       seg=_paste(tissue.seg, box, grid.shape), affine=grid.affine,
                       brain_mask=_paste(tissue.icv > 0.5, box, grid.shape),
                       tissue=_paste(tissue.labels(), box, grid.shape), acquired=acquired, params=summary)


# ---------------------------------------------------------------------------------------- writing


_BRATS2023 = {"t1": "t1n", "t1c": "t1c", "t2": "t2w", "flair": "t2f", "dwi": "dwi", "adc": "adc", "seg": "seg"}
_BRATS2021 = {"t1": "t1", "t1c": "t1ce", "t2": "t2", "flair": "flair", "seg": "seg"}
_BIDS = {"t1": ("anat", "T1w"), "t2": ("anat", "T2w"), "flair": ("anat", "FLAIR"), "dwi": ("dwi", "dwi"),
         "adc": ("dwi", "adc")}


def _paths(case: PhantomCase, out: Path) -> dict[str, Path]:
    """Where each file of a case goes in its cohort's layout."""
    cohort = COHORTS[case.dataset]
    kinds = [*case.images, "seg"] + ([] if cohort.skull_stripped else ["brainmask"])
    cid = case.case_id
    if cohort.layout in ("brats2023", "brats2021"):
        names = _BRATS2023 if cohort.layout == "brats2023" else _BRATS2021
        sep = "-" if cohort.layout == "brats2023" else "_"
        folder = out / cohort.name / cid
        return {k: folder / f"{cid}{sep}{names[k]}.nii.gz" for k in kinds}
    sub, ses = cid.split("_")
    root = out / cohort.name
    paths = {}
    for k in kinds:
        if k == "seg":
            paths[k] = root / "derivatives" / sub / ses / f"{cid}_msk.nii.gz"
        elif k == "brainmask":  # unstripped heads come with a brain mask, as a skull-stripping tool would give
            paths[k] = root / "derivatives" / sub / ses / f"{cid}_desc-brain_mask.nii.gz"
        else:
            folder, suffix = _BIDS[k]
            paths[k] = root / "rawdata" / sub / ses / folder / f"{cid}_{suffix}.nii.gz"
    return paths


def _to_disk(data: np.ndarray, affine: np.ndarray, lps: bool) -> tuple[np.ndarray, np.ndarray]:
    """RAS array and affine -> the stored orientation (LPS flips the first two axes)."""
    if not lps:
        return data, affine
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = np.array(data.shape[:2]) - 1
    return data[::-1, ::-1], affine @ flip


def write_case(case: PhantomCase, out: str | os.PathLike, overwrite: bool = False) -> Case:
    """Write one case in its cohort's layout under ``out``; returns its manifest entry."""
    out = Path(out)
    cohort = COHORTS[case.dataset]
    paths = _paths(case, out)
    if not overwrite:
        existing = [p for p in paths.values() if p.exists()]
        if existing:
            raise OverwriteError(f"{existing[0]} exists (pass overwrite=True / --overwrite to replace it)")
    descrip = DESCRIP.format(case.dataset)
    for kind, path in paths.items():
        if kind == "seg":
            data, affine, dtype = case.seg, case.affine, np.uint8
        elif kind == "brainmask":
            data, affine, dtype = case.brain_mask, case.affine, np.uint8
        else:
            data, affine = case.acquired.get(kind, (case.images[kind], case.affine))
            dtype = np.int16
        data, affine = _to_disk(data, affine, cohort.lps)
        save_nifti(data, affine, path, dtype=dtype, descrip=descrip, overwrite=overwrite)
    return Case(case.case_id, case.dataset, {k: paths[k].resolve() for k in paths})


def write_cohorts(out: str | os.PathLike, cases: int = 4, seed: int = 0, cohorts=None, spacing: float = 1.0,
                  progress: bool = True, overwrite: bool = False) -> list[Case]:
    """Simulate and write ``cases`` cases of every cohort (default: all four) under ``out``, plus
    ``out/manifest.csv`` (paths relative to ``out``). Existing files are never replaced unless
    ``overwrite``."""
    from tqdm.auto import tqdm

    out = Path(out)
    names = list(COHORTS) if cohorts is None else [cohorts] if isinstance(cohorts, str) else list(cohorts)
    unknown = [n for n in names if n not in COHORTS]
    if unknown:
        raise KeyError(f"unknown phantom cohort(s) {unknown}: known are {', '.join(COHORTS)}")
    manifest = out / "manifest.csv"
    if manifest.exists() and not overwrite:
        raise OverwriteError(f"{manifest} exists (pass overwrite=True / --overwrite to replace it)")
    written = []
    jobs = [(n, i) for n in names for i in range(cases)]
    for name, i in tqdm(jobs, desc="phantom cases", unit="case", disable=not progress):
        written.append(write_case(simulate_case(name, i, seed=seed, spacing=spacing), out, overwrite=overwrite))
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(written, manifest)
    return written
