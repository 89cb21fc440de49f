"""Montage PNGs of 2D slices (Pillow + numpy only): labelled grids for phantoms, validation and reports.

Orientation: :func:`display` turns a slice of a RAS volume into the radiological convention
(patient's right on the image's left; anterior up in axial views, superior up in coronal and
sagittal views).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .io import atomic_path

Panel = tuple[str, np.ndarray]
Row = tuple[str, Sequence[Panel]]

def display(volume: np.ndarray, axis: int = 2, index: int | None = None) -> np.ndarray:
    """A slice of a RAS volume (``axis`` 2 axial, 1 coronal, 0 sagittal) in radiological display order.

    Rows run from superior/anterior to inferior/posterior; in axial and coronal views columns run
    from the patient's right to left; in sagittal views from anterior to posterior.
    """
    index = volume.shape[axis] // 2 if index is None else index
    sl = np.take(volume, index, axis=axis)
    return np.ascontiguousarray(sl[::-1, ::-1].T)


def window(image: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Scale a 2D array to uint8 between its own ``low`` and ``high`` percentiles."""
    image = np.nan_to_num(np.asarray(image, dtype=np.float32))
    lo, hi = np.percentile(image, [low, high])
    if hi <= lo:
        hi = lo + 1.0
    return (np.clip((image - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _panel_image(array: np.ndarray, aspect: float) -> Image.Image:
    """A panel as a PIL image: 2D arrays are windowed, ``(H, W, 3)`` uint8 is used as RGB.

    ``aspect`` is the physical height of a row over the width of a column (1 for square pixels).
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] == 3:
        img = Image.fromarray(array.astype(np.uint8), "RGB")
    elif array.ndim == 2:
        img = Image.fromarray(window(array), "L").convert("RGB")
    else:
        raise ValueError(f"a panel must be 2D or (H, W, 3) RGB, got shape {array.shape}")
    if abs(aspect - 1) > 1e-3:
        img = img.resize((img.width, max(1, round(img.height * aspect))), Image.BILINEAR)
    return img


def montage(rows: Sequence[Row], path: str | os.PathLike, cell: int = 192, title: str | None = None,
            font_size: int = 14, aspects: Sequence[float] | None = None, overwrite: bool = True) -> Path:
    """Write a PNG grid (atomically): one row per ``(row_label, [(column_label, array), ...])``.

    Each 2D panel is windowed to its own 0.5-99.5 percentiles and fitted (aspect kept) into a
    ``cell`` x ``cell`` square; RGB panels are shown as given. Labels: row labels on the left,
    column labels above each panel. ``aspects`` (per row) corrects non-square pixels.
    """
    font = _font(font_size)
    n_cols = max((len(panels) for _, panels in rows), default=0)
    if not rows or n_cols == 0:
        raise ValueError("montage needs at least one row with one panel")
    label_w = max(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(r, font=font) for r, _ in rows) + 12
    label_h = font_size + 8
    title_h = label_h if title else 0
    width = int(label_w + n_cols * (cell + 4))
    height = int(title_h + len(rows) * (cell + label_h + 4))
    canvas = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((6, 3), title, fill=(255, 255, 255), font=font)
    for r, (row_label, panels) in enumerate(rows):
        y0 = title_h + r * (cell + label_h + 4)
        draw.text((6, y0 + label_h + cell // 2 - font_size // 2), row_label, fill=(255, 255, 255), font=font)
        aspect = aspects[r] if aspects is not None else 1.0
        for c, (col_label, array) in enumerate(panels):
            x0 = int(label_w + c * (cell + 4))
            draw.text((x0 + 2, y0 + 3), col_label, fill=(220, 220, 220), font=font)
            img = _panel_image(array, aspect)
            scale = min(cell / img.width, cell / img.height)
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                             Image.BILINEAR)
            canvas.paste(img, (x0 + (cell - img.width) // 2, y0 + label_h + (cell - img.height) // 2))
    with atomic_path(path, overwrite=overwrite) as tmp:
        grey_png(canvas).save(tmp, format="PNG", optimize=True)
    return Path(path)


def grey_png(image: Image.Image) -> Image.Image:
    """``image`` as one grey channel when all its pixels are grey (the same pixels, about half the
    file), else as it is: montages of MR images with white labels are grey unless a panel is RGB."""
    if image.mode == "RGB":
        red, green, blue = (np.asarray(band) for band in image.split())
        if np.array_equal(red, green) and np.array_equal(green, blue):
            return image.convert("L")
    return image


def outlined(rgb: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 48, 48)) -> np.ndarray:
    """``rgb`` (``(H, W, 3)`` uint8) with the outer edge of ``mask`` drawn in ``colour``: the pixels
    just outside it (4-neighbours), so the marked region's own pixels keep their intensity and a lesion
    of a few voxels stays visible under its outline."""
    from scipy.ndimage import binary_dilation  # here: the demo and quickstart import this module at start

    mask = np.asarray(mask, dtype=bool)
    grown = binary_dilation(mask)  # its default structure: the 4-neighbours
    out = np.array(rgb, dtype=np.uint8, copy=True)
    out[grown & ~mask] = colour
    return out


def lesion_centre(seg: np.ndarray) -> tuple[int, int, int]:
    """Voxel index of the lesion's centre of mass (the volume centre when there is no lesion)."""
    idx = np.argwhere(seg > 0)
    if len(idx) == 0:
        return tuple(n // 2 for n in seg.shape)
    return tuple(int(round(v)) for v in idx.mean(axis=0))
