"""Adapters for the folder layouts of public datasets; each turns a folder into manifest cases.

Recognised layouts (file names decide, folders are walked recursively):

- ``brats2018``: BraTS 2018-2021, ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz``;
- ``brats2023``: BraTS 2023+, ``<case>/<case>-{t1n,t1c,t2w,t2f,seg}.nii.gz``;
- ``bids``: BIDS / ISLES'22, ``rawdata/sub-*/[ses-*/]{anat,dwi}/*_{T1w,T2w,FLAIR,dwi,adc}.nii.gz`` with
  lesion masks ``derivatives/sub-*/[ses-*/]*_msk.nii.gz`` and brain masks ``*_desc-brain_mask.nii.gz``
  (``ce-gadolinium`` T1w is T1C);
- ``manifest``: a CSV in mmdiff's manifest format.

Any suffix that is a modality alias (``-dwi``, ``_adc``, ...) is read too, so a site that adds
sequences to a BraTS-style folder needs no new adapter. Files are matched by name only here;
geometry is checked when the cases are prepared (ISLES'22 FLAIR, on its own grid, is resampled
into DWI space then).
"""

from __future__ import annotations

import os
import re
from collections import Counter, OrderedDict
from pathlib import Path

from ..io import is_nifti, strip_nifti_suffix
from ..modalities import ALIASES, MODALITIES
from .manifest import Case, ManifestError, read_manifest

LAYOUTS = ("brats2018", "brats2023", "bids", "manifest")

_SEG = {"seg", "msk", "mask", "lesion"}
_BIDS_SUFFIX = {"t1w": "t1", "t2w": "t2", "flair": "flair", "dwi": "dwi", "adc": "adc", "t1c": "t1c",
                "msk": "seg", "mask": "seg", "dseg": "seg", "lesion": "seg"}
_BIDS_ENTITY = re.compile(r"(?:^|_)(sub-[A-Za-z0-9]+)(?:_(ses-[A-Za-z0-9]+))?")


class LayoutError(ValueError):
    """A folder whose files match no known layout, or match it inconsistently."""


def _kind_from_suffix(suffix: str) -> str | None:
    key = suffix.lower()
    if key in _SEG:
        return "seg"
    return ALIASES.get(key)


def _parse_brats(stem: str) -> tuple[str, str, str] | None:
    """``(layout, case_id, kind)`` for a BraTS-style file stem, else None."""
    for sep, layout in (("-", "brats2023"), ("_", "brats2018")):
        case_id, _, suffix = stem.rpartition(sep)
        if case_id:
            kind = _kind_from_suffix(suffix)
            if kind is not None:
                return layout, case_id, kind
    return None


def _parse_bids(path: Path) -> tuple[str, str] | None:
    """``(case_id, kind)`` for a BIDS file (``sub-X[_ses-Y]_..._<suffix>``), else None."""
    stem = Path(strip_nifti_suffix(path.name)).name
    entity = _BIDS_ENTITY.search(stem)
    if not entity or not stem.startswith("sub-"):
        return None
    suffix = stem.rsplit("_", 1)[-1].lower()
    if suffix == "mask" and "_desc-brain" in stem:
        return "_".join(e for e in entity.groups() if e), "brainmask"
    kind = _BIDS_SUFFIX.get(suffix)
    if kind == "t1" and re.search(r"_ce-[A-Za-z0-9]+", stem):
        kind = "t1c"
    if kind is None:
        return None
    case_id = "_".join(e for e in entity.groups() if e)
    return case_id, kind


def _walk_nifti(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if is_nifti(name) and not name.startswith("."):
                yield Path(dirpath) / name


def detect_layout(root: str | os.PathLike) -> str:
    """Name of the layout a folder (or manifest file) uses; raises LayoutError if none."""
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() == ".csv":
            return "manifest"
        raise LayoutError(f"{root}: a file that is not a manifest CSV")
    if not root.is_dir():
        raise LayoutError(f"{root}: no such folder")
    votes: Counter[str] = Counter()
    for path in _walk_nifti(root):
        if _parse_bids(path) is not None:
            votes["bids"] += 1
            continue
        parsed = _parse_brats(strip_nifti_suffix(path.name))
        if parsed is not None:
            votes[parsed[0]] += 1
    if not votes:
        if (root / "manifest.csv").is_file():
            return "manifest"
        raise LayoutError(
            f"{root}: no NIfTI files named in a known layout ({', '.join(LAYOUTS)}). Expected e.g. "
            "<case>/<case>_t1.nii.gz (BraTS 2018-2021), <case>/<case>-t1n.nii.gz (BraTS 2023), "
            "rawdata/sub-*/ses-*/anat/*_FLAIR.nii.gz (BIDS, ISLES'22), or a manifest.csv"
        )
    return votes.most_common(1)[0][0]


def scan(root: str | os.PathLike, dataset: str | None = None, layout: str | None = None) -> list[Case]:
    """Read a folder (or manifest) into cases. ``dataset`` names them (default: the folder's name).

    A manifest keeps its own dataset names unless ``dataset`` is given.
    """
    root = Path(root)
    layout = layout or detect_layout(root)
    if layout == "manifest":
        cases = read_manifest(root if root.is_file() else root / "manifest.csv")
        if dataset:
            for case in cases:
                case.dataset = dataset
        return cases
    if layout not in LAYOUTS:
        raise LayoutError(f"unknown layout {layout!r}: known layouts are {', '.join(LAYOUTS)}")
    dataset = dataset or root.resolve().name
    cases: OrderedDict[str, Case] = OrderedDict()
    for path in _walk_nifti(root):
        if layout == "bids":
            parsed = _parse_bids(path)
        else:
            parsed = _parse_brats(strip_nifti_suffix(path.name))
            if parsed is not None:
                if parsed[0] != layout:
                    continue
                parsed = parsed[1:]
        if parsed is None:
            continue
        case_id, kind = parsed
        case = cases.setdefault(case_id, Case(case_id, dataset))
        if kind in case.files:
            raise LayoutError(f"case {case_id!r}: two files for {kind}: {case.files[kind]} and {path}")
        case.files[kind] = path.resolve()
    found = [c for c in cases.values() if c.modalities]
    if not found:
        raise LayoutError(f"{root}: layout {layout} matched no case with an image")
    return found


def describe(cases: list[Case]) -> str:
    """A short human summary: cases per dataset and how often each modality is present."""
    lines = []
    by_dataset: OrderedDict[str, list[Case]] = OrderedDict()
    for case in cases:
        by_dataset.setdefault(case.dataset, []).append(case)
    for name, group in by_dataset.items():
        counts = Counter(k for c in group for k in c.files)
        parts = ", ".join(f"{k} {counts[k]}" for k in sorted(counts, key=_kind_order))
        lines.append(f"{name}: {len(group)} cases ({parts})")
    return "\n".join(lines)


def _kind_order(kind: str) -> tuple[int, str]:
    return (MODALITIES.index(kind), kind) if kind in MODALITIES else (len(MODALITIES), kind)


__all__ = ["LAYOUTS", "LayoutError", "ManifestError", "detect_layout", "scan", "describe"]
