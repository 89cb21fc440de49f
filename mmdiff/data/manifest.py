"""The manifest: one row per file, ``case_id, dataset, modality, path``.

``modality`` is a canonical modality name or ``seg`` (a lesion mask) or ``brainmask``. Paths may be
absolute or relative to the manifest's folder. Every source mmdiff reads (real layouts, phantom
cohorts, user lists) becomes a manifest, so preparation has one code path.
"""

from __future__ import annotations

import csv
import io as _io
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from ..io import write_text
from ..modalities import KNOWN_MODALITIES, canonical

COLUMNS = ("case_id", "dataset", "modality", "path")
MASK_KINDS = ("seg", "brainmask")


class ManifestError(ValueError):
    """A manifest that cannot be used, with the row and the reason."""


@dataclass
class Case:
    """The files of one case: modality (or ``seg``/``brainmask``) -> absolute path."""

    case_id: str
    dataset: str
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def modalities(self) -> list[str]:
        return [m for m in self.files if m not in MASK_KINDS]


def normalise_kind(name: str) -> str:
    key = name.strip().lower()
    if key in ("seg", "mask", "label", "lesion", "msk"):
        return "seg"
    if key in ("brainmask", "brain_mask", "brain"):
        return "brainmask"
    return canonical(key, KNOWN_MODALITIES)


def rows_to_cases(rows: Iterable[dict], base: Path | None = None) -> list[Case]:
    """Group manifest rows into cases, checking every row; order of first appearance is kept."""
    cases: OrderedDict[tuple[str, str], Case] = OrderedDict()
    for n, row in enumerate(rows, start=2):
        missing = [c for c in COLUMNS if not (row.get(c) or "").strip()]
        if missing:
            raise ManifestError(f"row {n}: empty {', '.join(missing)}")
        try:
            kind = normalise_kind(row["modality"])
        except ValueError as exc:
            raise ManifestError(f"row {n}: {exc}") from exc
        path = Path(row["path"].strip())
        if not path.is_absolute() and base is not None:
            path = base / path
        key = (row["dataset"].strip(), row["case_id"].strip())
        case = cases.setdefault(key, Case(key[1], key[0]))
        if kind in case.files:
            raise ManifestError(f"row {n}: case {key[1]!r} of {key[0]!r} lists {kind} twice")
        case.files[kind] = path
    return list(cases.values())


def read_manifest(path: str | os.PathLike) -> list[Case]:
    path = Path(path)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or set(COLUMNS) - set(reader.fieldnames):
            raise ManifestError(f"{path}: needs the columns {', '.join(COLUMNS)}; has {reader.fieldnames}")
        return rows_to_cases(reader, base=path.parent.resolve())


def write_manifest(cases: Iterable[Case], path: str | os.PathLike, relative: bool = True) -> Path:
    """Write cases as a manifest (atomically); paths relative to its folder where possible."""
    path = Path(path)
    base = path.parent.resolve()
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(COLUMNS)
    for case in cases:
        for kind, file in case.files.items():
            file = Path(file).resolve()
            shown = os.path.relpath(file, base) if relative and _under(file, base) else str(file)
            writer.writerow([case.case_id, case.dataset, kind, shown])
    return write_text(path, buf.getvalue())


def _under(path: Path, base: Path) -> bool:
    try:
        path.relative_to(base)
        return True
    except ValueError:
        return False
