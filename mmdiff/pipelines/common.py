"""What both mmdiff pipelines share: reading and checking the inputs, the training preprocessing,
slice batches, and putting the results back on the input grid.

Preprocessing is the one the model was trained with:

- brain mask: the one given, or :func:`~mmdiff.data.prepare.derive_brain_mask` over the inputs;
- intensities: the pipeline's :class:`~mmdiff.data.preprocessing.MRIPreprocessor` (saved with the
  model; pipelines saved without one use the 99.5th-percentile rule), per input over the whole
  volume (a 2D input: over the slice);
- in plane, the network runs on a window around the brain: the brain's bounding box over all slices,
  grown symmetrically to the next multiple of the model's size multiple (zero-padded where it
  leaves the grid). Nothing with brain is cropped and the write-back is exact; outside the window
  the outputs are 0. Training saw the brain centred in 192 x 192 at 1 mm, and the networks are
  fully convolutional, so other window sizes run (inputs should still be skull-stripped and about
  1 mm in plane, like the training data);
- axial slices without brain are not run and come back as 0;
- the GAN pipeline narrows the window further, slice by slice (:meth:`PreparedInputs.per_slice`):
  each slice runs on its own brain's box plus a margin, in multiples of the size multiple (at most
  the volume window), so the small slices at the top and bottom of the head cost what their brain
  does (a BraTS volume: about three quarters of the volume window's pixels). A slice's result does not
  depend on the batching or on which other slices are run.

Outputs are in the model's normalised [0, 1] scale (not scanner units), zero outside the brain, on
the input's own grid: an array input gives arrays of its shape; a NIfTI input gives arrays in the
file's own voxel order (``nib.load(path).get_fdata()``'s), or ``Nifti1Image``s with the file's
affine and header, marked synthetic in ``descrip``. NIfTI inputs on different grids that overlap
are resampled (linear) by their affines onto the first input's grid, with a warning.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import nibabel as nib
import numpy as np
import torch
from diffusers.utils import BaseOutput
from nibabel.processing import resample_from_to

from ..data.prepare import derive_brain_mask, grids_overlap, same_grid
from ..data.preprocessing import MRIPreprocessor
from ..io import SYNTHETIC_DESCRIP, Volume, VolumeError, load_volume
from ..modalities import KNOWN_MODALITIES, canonical
from ..models.pfm import NULL_DATASET_ID

OUTPUT_TYPES = ("np", "pt", "nifti")

#: background kept round each slice's brain by :meth:`PreparedInputs.per_slice`, in pixels: the GAN's
#: GroupNorm sees the background, and the brain's edge the convolutions' zero padding. Chosen on the
#: held-out set (BENCHMARKS.md session 15): 0, 8 and 16 pixels gave 23.29, 23.39 and 23.32 dB, the
#: volume window 23.35
SLICE_MARGIN = 8

ImageInput = np.ndarray | torch.Tensor | str | os.PathLike


@dataclass
class MMDiffPipelineOutput(BaseOutput):
    """Output of the mmdiff pipelines.

    Unlike most diffusers pipelines, whose ``images`` is a batch (a list or a stacked array), an
    mmdiff call is one exam and ``images`` is a dict keyed by sequence name (``out.images["t1c"]``):
    the targets are different images of one subject, each on the input's own grid, and a NIfTI
    output carries its own header. One call is one exam; a list of exams is refused.

    Args:
        images: target modality -> synthetic image, shaped like the input, in the model's [0, 1] scale.
        uncertainty: target -> per-voxel standard deviation over the samples (``num_samples > 1``), else None.
        mask: the brain mask used (outputs are zero outside it).
    """

    images: dict
    uncertainty: dict | None
    mask: np.ndarray | torch.Tensor | nib.Nifti1Image


def call_defaults(pipe, *names: str) -> dict:
    """The defaults of ``pipe.__call__``'s (a pipeline or its class) keyword arguments ``names``: the
    pipeline owns its default settings (steps, samples), and the commands that leave one unset ask it,
    so the two cannot drift."""
    parameters = inspect.signature((pipe if isinstance(pipe, type) else type(pipe)).__call__).parameters
    return {name: parameters[name].default for name in names if name in parameters}


def diffusion_settings(pipe, steps: int | None = None, samples: int | None = None) -> tuple[int, int]:
    """``(steps, samples)`` for a diffusion pipeline: those given, the pipeline's defaults for None (its
    call's default steps; its :attr:`default_num_samples`, the K it was calibrated at)."""
    defaults = call_defaults(pipe, "num_inference_steps")
    return (defaults["num_inference_steps"] if steps is None else steps,
            pipe.default_num_samples if samples is None else samples)


def to_network(images: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> the networks' [-1, 1]."""
    return images * 2 - 1


def from_network(images: torch.Tensor) -> torch.Tensor:
    """The networks' [-1, 1] -> [0, 1], clamped."""
    return ((images + 1) / 2).clamp(0, 1)


def inside_brain(images: torch.Tensor, brain: torch.Tensor) -> torch.Tensor:
    """Network-space images ``[B, M, H, W]`` with background (-1, i.e. 0 in [0, 1]) outside the brain
    ``[B, H, W]``: what a pipeline returns of them (:meth:`PreparedInputs.output` zeroes every output
    outside the brain mask). Training the GAN on this (``model.inside_brain``) scores what users get."""
    return torch.where(brain.to(torch.bool)[:, None], images, torch.full_like(images, -1.0))


def resolve_dataset_id(dataset: str | None, dataset_names: Sequence[str] | None) -> int:
    """A dataset name -> the model's id for it; ``None`` or an unknown name (with a warning) -> null (-1)."""
    if dataset is None:
        return NULL_DATASET_ID
    names = [str(n).lower() for n in dataset_names or ()]
    if str(dataset).lower() in names:
        return names.index(str(dataset).lower())
    known = ", ".join(dataset_names) if dataset_names else "none recorded"
    warnings.warn(
        f"dataset {dataset!r} is not one the model was trained on (known: {known}); "
        "using the null dataset (unseen site)", stacklevel=4,
    )
    return NULL_DATASET_ID


def _canonical_names(names, modalities: Sequence[str], what: str) -> list[str]:
    found = []
    for name in names:
        modality = canonical(name, KNOWN_MODALITIES)
        if modality not in modalities:
            raise ValueError(f"{what} {name!r}: the model was not trained on {modality} "
                             f"(it knows {', '.join(modalities)})")
        if modality in found:
            raise ValueError(f"{what} {modality} is given twice")
        found.append(modality)
    return found


def _read(name: str, value) -> np.ndarray | Volume:
    """A NIfTI path -> its canonical ``Volume`` (a ``Volume`` already read is taken as is); an array or
    tensor -> float32 array (2D or 3D)."""
    if isinstance(value, Volume):
        return value
    if isinstance(value, (str, os.PathLike)):
        return load_volume(value)
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
    if np.iscomplexobj(value) or (isinstance(value, torch.Tensor) and value.is_complex()):
        raise ValueError(f"{name}: complex values; pass real images (the magnitude, e.g. abs(image))")
    if isinstance(value, torch.Tensor):
        value = value.float().numpy()
    array = np.array(value, dtype=np.float32)
    if array.ndim not in (2, 3):
        raise ValueError(f"{name}: expected a 2D slice [H, W] or a volume [X, Y, Z], got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name}: empty array of shape {array.shape}")
    bad = ~np.isfinite(array)
    if bad.any():
        warnings.warn(f"{name}: {int(bad.sum())} NaN/Inf values set to 0", stacklevel=5)
        array[bad] = 0.0
    return array


def _on_grid(name: str, volume: Volume, reference: Volume, reference_name: str) -> np.ndarray:
    """``volume``'s data on ``reference``'s canonical grid (resampled, linear, if the grids differ)."""
    if same_grid(volume, reference):
        return volume.data
    if not grids_overlap(volume, reference):
        raise ValueError(f"{name} ({volume.path}) does not overlap {reference_name} ({reference.path}): "
                         "check the affines; all inputs must cover the same anatomy")
    warnings.warn(f"{name} is on another grid than {reference_name}: resampled onto it by the affines",
                  stacklevel=5)
    image = nib.Nifti1Image(volume.data, volume.affine)
    return resample_from_to(image, (reference.shape, reference.affine), order=1, cval=0.0).get_fdata(
        dtype=np.float32)


def _brain_mask(volumes: list[np.ndarray]) -> np.ndarray:
    """``derive_brain_mask`` for volumes ``[X, Y, Z]``, with a clear error for empty inputs."""
    try:
        return derive_brain_mask(volumes)
    except VolumeError as exc:
        raise ValueError("every input image is zero: there is nothing to synthesise from") from exc


@dataclass
class PreparedInputs:
    """Checked, normalised inputs in the network's window, and what is needed to write results back.

    ``images`` is ``[M, X', Y', Z]`` over all the model's modalities (zeros for non-sources): the
    in-plane window ``window = ((x0, x1), (y0, y1))`` of the input grid (it may reach past the grid's
    edges, where it is zero); ``brain`` is ``[X, Y, Z]``; ``slices`` are the axial slices with brain.
    """

    images: np.ndarray
    brain: np.ndarray
    source_mask: np.ndarray
    target_mask: np.ndarray
    targets: list[str]
    slices: np.ndarray
    window: tuple[tuple[int, int], tuple[int, int]]
    output_type: str
    reference: Volume | None
    affine: np.ndarray | None
    is_2d: bool
    crops: np.ndarray  # [Z, 2, 2]: each slice's window (x0, x1), (y0, y1) inside the volume window

    @property
    def num_slices(self) -> int:
        return self.brain.shape[2]

    def only(self, slices: Sequence[int] | None) -> PreparedInputs:
        """The same inputs with only the axial ``slices`` (indices into ``Z``) run; the others come
        back as 0, like slices without brain. A 2.5D model still reads their neighbours as context, so
        a few slices of a volume cost a few slices, with the result they have in the whole volume."""
        if slices is None:
            return self
        wanted = np.asarray(list(slices))
        if wanted.ndim != 1 or (wanted.size and not np.issubdtype(wanted.dtype, np.integer)):
            raise ValueError(f"slices must be a list of axial slice indices, got {slices!r}")
        outside = wanted[(wanted < 0) | (wanted >= self.num_slices)]
        if outside.size:
            raise ValueError(f"slices {outside.tolist()} are outside the volume's {self.num_slices} axial slices")
        return dataclasses.replace(self, slices=np.intersect1d(self.slices, wanted))

    def per_slice(self, multiple: int, margin: int) -> PreparedInputs:
        """The same inputs, each slice run on its own window: its brain's bounding box grown by
        ``margin`` pixels on every side and then symmetrically to multiples of ``multiple``, at most
        the volume window and moved inside it where it would leave it. Batches then hold slices of
        one window size (each at its own place); outside a slice's window its results are 0, as
        outside the brain. The windows come from the whole volume's brain, so a slice's result does
        not depend on the batching or on which slices are run (``slices=``).

        Only for a network whose noise, if any, is not shared between slices (the GAN's generator)."""
        brain = self._brain_in_window()
        crops = self.crops.copy()
        for z in self.slices:
            for axis, size in enumerate(brain.shape[:2]):
                start, stop = _span(brain[..., z].any(axis=1 - axis), multiple, margin)
                if stop - start > size:  # at most the volume window ...
                    start, stop = 0, size
                shift = max(-start, 0) - max(stop - size, 0)  # ... and inside it
                crops[z, axis] = start + shift, stop + shift
        return dataclasses.replace(self, crops=crops)

    def _groups(self, batch_size: int) -> list[np.ndarray]:
        """The batches' slice indices: runs of ``batch_size`` slices up the volume; with per-slice
        windows, of slices whose windows have one size (groups in order of their first slice)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
        sizes = self.crops[self.slices, :, 1] - self.crops[self.slices, :, 0]
        by_size: dict[tuple[int, int], list[int]] = {}
        for z, size in zip(self.slices.tolist(), map(tuple, sizes.tolist())):
            by_size.setdefault(size, []).append(z)
        runs = [np.asarray(zs) for zs in by_size.values()]
        return [run[start:start + batch_size] for run in runs for start in range(0, len(run), batch_size)]

    def _crop(self, z: int) -> tuple[slice, slice]:
        return slice(*self.crops[z, 0]), slice(*self.crops[z, 1])

    def num_batches(self, batch_size: int) -> int:
        return len(self._groups(batch_size))

    def batches(self, batch_size: int, generator=None) -> Iterator[tuple[np.ndarray, torch.Tensor, object]]:
        """``(slice indices, images [B, M, X', Y'] in [0, 1], generator for them)`` per batch of brain
        slices (with :meth:`per_slice`, ``X' x Y'`` is the batch's window size).

        A list of generators holds one per axial slice (``Z``; 1 for a 2D input), so a slice gets the
        same noise whatever the batching; a single generator is passed on as is.
        """
        if isinstance(generator, list) and len(generator) != self.num_slices:
            raise ValueError(f"a list of generators needs one per axial slice ({self.num_slices}), "
                             f"got {len(generator)}")
        for index in self._groups(batch_size):
            batch = torch.from_numpy(np.stack([self.images[(slice(None), *self._crop(z), z)] for z in index]))
            yield index, batch, [generator[k] for k in index] if isinstance(generator, list) else generator

    def brain_batch(self, index: np.ndarray) -> torch.Tensor:
        """The brain mask of the slices ``index``, each in its window, as :meth:`batches` gives their
        images: bool ``[B, X', Y']``."""
        return torch.from_numpy(np.stack([self._brain_in_window(z)[self._crop(z)] for z in index]))

    def _brain_in_window(self, z: int | None = None) -> np.ndarray:
        """The brain mask on the volume window's grid ``[X', Y', Z]`` (the images' grid), or its axial
        slice ``z`` ``[X', Y']``."""
        brain = self.brain if z is None else self.brain[..., z:z + 1]
        out = np.zeros(self.images.shape[1:3] + brain.shape[2:], dtype=bool)
        out[_window_part(self.window, self.brain.shape)] = brain[_grid_part(self.window, self.brain.shape)]
        return out if z is None else out[..., 0]

    def context(self, index: np.ndarray, k: int) -> torch.Tensor:
        """The ``k`` axial neighbours below and above each slice in ``index``: ``[B, M, 2k, X', Y']``
        in [0, 1] (order ``-k .. -1, +1 .. +k``; zeros beyond the volume; in the slice's own window),
        for a 2.5D model."""
        offsets = [d for d in range(-k, k + 1) if d]
        out = None
        for b, z in enumerate(index):
            plane = self.images[(slice(None), *self._crop(z))]
            if out is None:
                out = np.zeros((len(index), plane.shape[0], len(offsets)) + plane.shape[1:3], dtype=np.float32)
            for n, d in enumerate(offsets):
                if 0 <= z + d < self.num_slices:
                    out[b, :, n] = plane[..., z + d]
        return torch.from_numpy(out)

    def canvas(self) -> np.ndarray:
        """Zeros ``[T, X', Y', Z]`` to collect per-slice results for the targets."""
        return np.zeros((len(self.targets),) + self.images.shape[1:], dtype=np.float32)

    def put(self, canvas: np.ndarray, index: np.ndarray, values: torch.Tensor) -> None:
        """Write ``values [B, T, X', Y']`` into the slices ``index`` of ``canvas`` (each in its window)."""
        values = values.float().cpu().numpy()
        for b, z in enumerate(index):
            canvas[(slice(None), *self._crop(z), z)] = values[b]

    def _to_input_grid(self, volume: np.ndarray) -> np.ndarray:
        """``[X', Y', Z]`` in the window -> the input's grid (zeros outside the window)."""
        full = np.zeros(self.brain.shape, dtype=volume.dtype)
        full[_grid_part(self.window, self.brain.shape)] = volume[_window_part(self.window, self.brain.shape)]
        return full

    def _to_source(self, volume: np.ndarray) -> np.ndarray:
        """``[X, Y, Z]`` on the canonical input grid -> the input's own voxel order and shape."""
        if self.reference is not None:
            volume = self.reference.to_source(volume)
        return volume[..., 0] if self.is_2d else volume

    def _convert(self, array: np.ndarray, synthetic: bool = True):
        if self.output_type == "pt":
            return torch.from_numpy(np.ascontiguousarray(array))
        if self.output_type == "np":
            return array
        if self.reference is not None:
            affine, header = self.reference.source_affine, self.reference.header.copy()
        else:
            affine, header = self.affine, None
        image = nib.Nifti1Image(array if synthetic else array.astype(np.uint8), affine, header)
        image.set_data_dtype(np.float32 if synthetic else np.uint8)
        image.header.set_slope_inter(1.0, 0.0)
        image.header.set_qform(affine, code=1)
        image.header.set_sform(affine, code=1)
        image.header["descrip"] = (SYNTHETIC_DESCRIP if synthetic else "mmdiff brain mask").encode()[:79]
        return image

    def output(self, images: np.ndarray, uncertainty: np.ndarray | None, return_dict: bool = True):
        """Per-target canvases -> :class:`MMDiffPipelineOutput` (or its fields as a tuple)."""
        def per_target(canvas):
            return {name: self._convert(self._to_source(self._to_input_grid(volume) * self.brain))
                    for name, volume in zip(self.targets, canvas)}

        result = (per_target(images), None if uncertainty is None else per_target(uncertainty),
                  self._convert(self._to_source(self.brain), synthetic=False))
        return MMDiffPipelineOutput(*result) if return_dict else result


def brain_window(brain: np.ndarray, multiple: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The in-plane window ``((x0, x1), (y0, y1))`` the network runs on: the bounding box of ``brain``
    ``[X, Y, Z]`` over all slices, grown symmetrically to multiples of ``multiple`` (it may reach past
    the grid's edges)."""
    return tuple(_span(brain.any(axis=tuple(a for a in range(3) if a != axis)), multiple) for axis in (0, 1))


def _span(present: np.ndarray, multiple: int, margin: int = 0) -> tuple[int, int]:
    """``(start, stop)`` along one axis: where ``present`` is true, grown by ``margin`` on each side and
    then symmetrically to a multiple of ``multiple`` (it may reach past the axis's ends)."""
    where = np.flatnonzero(present)
    lo, hi = int(where[0]) - margin, int(where[-1]) + 1 + margin
    extra = -(hi - lo) % multiple
    return lo - extra // 2, hi + extra - extra // 2


def _grid_part(window, shape) -> tuple[slice, slice]:
    """The part of the grid ``shape`` that the window covers."""
    return tuple(slice(max(lo, 0), min(hi, n)) for (lo, hi), n in zip(window, shape[:2]))


def _window_part(window, shape) -> tuple[slice, slice]:
    """Where that part lies inside the window."""
    return tuple(slice(max(lo, 0) - lo, min(hi, n) - lo) for (lo, hi), n in zip(window, shape[:2]))


def prepare_inputs(
    images: Mapping[str, ImageInput],
    modalities: Sequence[str],
    targets: str | Sequence[str] | None,
    brain_mask: ImageInput | None,
    multiple: int,
    output_type: str = "np",
    affine: np.ndarray | None = None,
    preprocessor: MRIPreprocessor | None = None,
    slice_margin: int | None = None,
) -> PreparedInputs:
    """Check and preprocess a pipeline call's inputs for a model over ``modalities`` whose slice sides
    must be multiples of ``multiple``, with the model's intensity rule (``None``: the 99.5th-percentile
    rule of pipelines saved without one). Every problem raises a ``ValueError`` that names it.

    ``slice_margin``: run each slice on its own window, with up to this many pixels of background
    round its brain (:meth:`PreparedInputs.per_slice`); ``None``: every slice on the volume's window."""
    preprocessor = preprocessor or MRIPreprocessor.legacy()
    modalities = list(modalities)
    if not isinstance(images, Mapping):  # e.g. a list of cases: one call is one exam
        raise ValueError(f"images must be one exam, a mapping sequence -> image ({{'t1': ..., 'flair': ...}}), "
                         f"not a {type(images).__name__}: call the pipeline once per case")
    if not images:
        raise ValueError("no input images: pass images={'t1': ..., 'flair': ...}")
    sources = _canonical_names(images, modalities, "input")
    if targets is None:
        targets = [m for m in modalities if m not in sources]
    else:
        targets = _canonical_names([targets] if isinstance(targets, str) else targets, modalities, "target")
        given = [t for t in targets if t in sources]
        if given:
            raise ValueError(f"target {', '.join(given)} is also an input: targets must be missing modalities")
    if not targets:
        raise ValueError(f"nothing to synthesise: every modality of the model ({', '.join(modalities)}) is given")
    targets = [m for m in modalities if m in targets]
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")

    with ThreadPoolExecutor(max_workers=len(sources)) as pool:  # gzip inflation releases the GIL
        read = dict(zip(sources, pool.map(_read, sources, images.values())))
    kinds = {isinstance(v, Volume) for v in read.values()}
    if len(kinds) > 1:
        raise ValueError("inputs mix NIfTI paths and arrays: pass every input the same way")
    reference = next(iter(read.values())) if kinds == {True} else None
    reference_name = sources[0]
    if reference is not None:
        if affine is not None:
            raise ValueError("affine is only for array inputs: NIfTI inputs carry their own")
        arrays = {name: _on_grid(name, vol, reference, reference_name) for name, vol in read.items()}
    else:
        arrays = read
        dims = {name: a.ndim for name, a in arrays.items()}
        if len(set(dims.values())) > 1:
            raise ValueError(f"inputs mix 2D slices and 3D volumes ({dims}): pass all as 2D or all as 3D")
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"inputs have different shapes {shapes}: give every sequence on one grid")
    is_2d = next(iter(arrays.values())).ndim == 2
    if output_type == "nifti" and (is_2d or (reference is None and affine is None)):
        raise ValueError("output_type='nifti' needs NIfTI inputs, or 3D arrays and an affine=")
    volumes = {name: a[..., None] if is_2d else a for name, a in arrays.items()}
    grid_shape = next(iter(volumes.values())).shape

    if brain_mask is None:
        brain = _brain_mask(list(volumes.values()))
    else:
        mask = _read("brain_mask", brain_mask)
        if isinstance(mask, Volume) != (reference is not None):
            raise ValueError("brain_mask must be given like the inputs: a NIfTI path with NIfTI inputs, "
                             "an array with array inputs")
        if isinstance(mask, Volume):
            mask = _on_grid("brain_mask", mask, reference, reference_name)
        mask = mask[..., None] if is_2d and mask.ndim == 2 else mask
        if mask.shape != grid_shape:
            raise ValueError(f"brain_mask has shape {mask.shape}, the inputs {grid_shape}")
        brain = mask >= 0.5
    if not brain.any():
        raise ValueError("the brain mask is empty")

    window = brain_window(brain, multiple)
    stack = np.zeros((len(modalities), window[0][1] - window[0][0], window[1][1] - window[1][0], grid_shape[2]),
                     dtype=np.float32)
    inside, part = _grid_part(window, grid_shape), _window_part(window, grid_shape)
    for name, volume in volumes.items():
        normalised, top = preprocessor.normalise(volume, brain)
        if top <= 0:
            warnings.warn(f"{name} is zero inside the brain", stacklevel=4)
        stack[(modalities.index(name),) + part] = normalised[inside]
    whole = np.zeros((grid_shape[2], 2, 2), dtype=np.int64)  # every slice on the volume window
    whole[:, :, 1] = stack.shape[1:3]
    prepared = PreparedInputs(
        images=stack,
        crops=whole,
        brain=brain,
        source_mask=np.isin(modalities, sources),
        target_mask=np.isin(modalities, targets),
        targets=targets,
        slices=np.flatnonzero(brain.any(axis=(0, 1))),
        window=window,
        output_type=output_type,
        reference=reference,
        affine=None if affine is None else np.asarray(affine, dtype=np.float64),
        is_2d=is_2d,
    )
    return prepared if slice_margin is None else prepared.per_slice(multiple, slice_margin)
