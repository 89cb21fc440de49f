"""The MRI sequences mmdiff knows, their aliases, and availability masks.

Modality order is fixed (``t1, t2, t1c, flair, dwi, adc``); every array that stacks modalities
(``[M, H, W]`` slices, availability vectors, source masks) follows it. A model stores the modality
list it was trained with, so other lists stay possible: the helpers take ``modalities=`` for that.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

MODALITIES: tuple[str, ...] = ("t1", "t2", "t1c", "flair", "dwi", "adc")

# Sequences a model may be trained on besides the default six (its config lists its own modalities,
# in order). Files of these are read and prepared like the six; a model that was not trained on one
# says so when it is given.
EXTRA_MODALITIES: tuple[str, ...] = ("pd",)
KNOWN_MODALITIES: tuple[str, ...] = MODALITIES + EXTRA_MODALITIES

DESCRIPTIONS: dict[str, str] = {
    "t1": "T1-weighted, pre-contrast",
    "t2": "T2-weighted",
    "t1c": "T1-weighted, post-gadolinium",
    "flair": "T2-FLAIR",
    "dwi": "diffusion-weighted trace, b~1000 s/mm^2",
    "adc": "apparent diffusion coefficient map",
    "pd": "proton-density-weighted",
}

# Lower-case alias -> canonical name. Covers BraTS 2018-2021 (t1ce), BraTS 2023+ (t1n, t2w, t2f),
# BIDS suffixes (T1w, T2w, FLAIR, dwi) and names seen in clinical exports.
ALIASES: dict[str, str] = {
    **{m: m for m in MODALITIES},
    "t1n": "t1", "t1w": "t1", "t1pre": "t1", "t1native": "t1", "t1_pre": "t1",
    "t2w": "t2",
    "t1ce": "t1c", "t1gd": "t1c", "t1post": "t1c", "t1_post": "t1c", "t1c+": "t1c", "t1wce": "t1c",
    "t1_gd": "t1c", "t1cw": "t1c", "cet1w": "t1c",
    "t2f": "flair", "t2flair": "flair", "t2_flair": "flair", "flair": "flair",
    "trace": "dwi", "tracew": "dwi", "dw": "dwi", "b1000": "dwi",
    "adcmap": "adc",
    "pd": "pd", "pdw": "pd", "pd_w": "pd",
}


class UnknownModalityError(ValueError):
    """A sequence name that maps to none of the known modalities."""


def canonical(name: str, modalities: Sequence[str] = MODALITIES) -> str:
    """Map a sequence name or alias (any case, ``-``/``_`` ignored at the ends) to its canonical name."""
    key = str(name).strip().lower().strip("-_ ")
    found = ALIASES.get(key, key)
    if found not in modalities:
        known = ", ".join(modalities)
        aliases = ", ".join(sorted(a for a, m in ALIASES.items() if a != m and m in modalities))
        raise UnknownModalityError(
            f"unknown modality {name!r}: known modalities are {known} (aliases: {aliases})"
        )
    return found


def index(name: str, modalities: Sequence[str] = MODALITIES) -> int:
    """Position of a modality (name or alias) in ``modalities``."""
    return list(modalities).index(canonical(name, modalities))


def availability(present: Iterable[str], modalities: Sequence[str] = MODALITIES) -> np.ndarray:
    """Bool vector over ``modalities``: True where the named sequences are present."""
    mask = np.zeros(len(modalities), dtype=bool)
    for name in present:
        mask[index(name, modalities)] = True
    return mask


def names(mask: Sequence[bool] | np.ndarray, modalities: Sequence[str] = MODALITIES) -> list[str]:
    """The modality names where ``mask`` is True, in canonical order."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (len(modalities),):
        raise ValueError(f"mask has shape {mask.shape}, expected ({len(modalities)},)")
    return [m for m, on in zip(modalities, mask) if on]


def mask_key(mask: Sequence[bool] | np.ndarray) -> str:
    """A compact string for a mask, e.g. ``'110100'``; used as a group key and in file names."""
    return "".join("1" if bool(v) else "0" for v in np.asarray(mask).ravel())


def parse_mask_key(key: str) -> np.ndarray:
    """Inverse of :func:`mask_key`."""
    if not key or set(key) - {"0", "1"}:
        raise ValueError(f"not a mask key: {key!r}")
    return np.array([c == "1" for c in key], dtype=bool)
