"""Intensity preprocessing: how a volume's scanner units become the networks' [0, 1] units.

One component owns the rule, and the same instance serves ``mmdiff prepare`` (it is stored in the
cache's ``cache.json``), training (the trainer reads it from the cache) and both pipelines (it is
saved in the pipeline folder as ``preprocessor/preprocessor_config.json``), so a model is always fed
the way it was trained, as diffusers' ``VaeImageProcessor`` and nnU-Net's plans do for theirs.

Two rules, per volume and sequence, inside the brain mask, background 0:

- ``"median"`` (default): divide by ``median_scale`` times the median of the brain's voxels and clip
  to [0, 1]. Normal brain sits near ``1 / median_scale`` whatever the lesion: a median cannot be
  moved by a tumour that covers less than half the brain, so an enhancing rim keeps its contrast to
  normal brain from case to case. These are the units ``mmdiff evaluate`` scores in (3 x the
  healthy-brain median), so training optimises what is reported.
- ``"percentile"``: clip at the ``clip_percentile``-th percentile of the brain's voxels and scale to
  [0, 1] (the rule of mmdiff's first models). The brightest tissue sets the scale, so on T1C a large
  enhancing tumour moves it, and with it every other voxel.

Pipelines saved before this component existed load with ``preprocessor=None``, which means the old
rule, ``MRIPreprocessor(normalisation="percentile", clip_percentile=99.5)``.

The class subclasses diffusers' ``SchedulerMixin`` only for its ``save_pretrained`` /
``from_pretrained`` of a config-only component: diffusers saves and loads a pipeline component only
if it is a ``ModelMixin`` (which needs weights) or a ``SchedulerMixin``. It is not a scheduler.
"""

from __future__ import annotations

import numpy as np
from diffusers import ConfigMixin, ModelMixin, SchedulerMixin  # noqa: F401  (diffusers' loader looks these names up here)
from diffusers.configuration_utils import register_to_config

from ..validation import PREPROCESSOR_CONFIG

NORMALISATIONS = ("median", "percentile")


class MRIPreprocessor(SchedulerMixin, ConfigMixin):
    """The intensity rule a model was trained with (see the module docstring).

    Args:
        normalisation: ``"median"`` or ``"percentile"``.
        median_scale: for ``"median"``: the brain median maps to ``1 / median_scale``.
        clip_percentile: for ``"percentile"``: this percentile of the brain maps to 1.
    """

    config_name = PREPROCESSOR_CONFIG

    @register_to_config
    def __init__(self, normalisation: str = "median", median_scale: float = 3.0, clip_percentile: float = 99.5):
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
        if not median_scale > 0:
            raise ValueError(f"median_scale must be positive, got {median_scale}")
        if not 50 < clip_percentile <= 100:
            raise ValueError(f"clip_percentile must be in (50, 100], got {clip_percentile}")

    @classmethod
    def legacy(cls) -> "MRIPreprocessor":
        """The rule of pipelines saved without a preprocessor: 99.5th percentile inside the brain = 1."""
        return cls(normalisation="percentile", clip_percentile=99.5)

    def scale(self, image: np.ndarray, brain: np.ndarray) -> float:
        """The value that maps to 1 for ``image`` (0 when the brain is empty or dark)."""
        inside = image[brain]
        if inside.size == 0:
            return 0.0
        if self.config.normalisation == "median":
            return float(self.config.median_scale) * float(np.median(inside))
        return float(np.percentile(inside, self.config.clip_percentile))

    def normalise(self, image: np.ndarray, brain: np.ndarray) -> tuple[np.ndarray, float]:
        """``image`` in [0, 1] units (clipped; 0 outside ``brain``) and the scale used (0: empty input)."""
        top = self.scale(image, brain)
        if top <= 0:
            return np.zeros_like(image, dtype=np.float32), top
        out = np.empty(image.shape, dtype=np.float32)  # one float32 array, worked in place: a volume's
        np.clip(image, 0.0, top, out=out, casting="same_kind")  # temporaries cost more than the maths
        np.divide(out, np.float32(top), out=out)
        out[~brain] = 0.0
        return out, top

    def describe(self) -> str:
        """The rule in words, for sidecars and model cards."""
        if self.config.normalisation == "median":
            return (f"per volume, divided by {self.config.median_scale:g} x the median inside the brain, "
                    "clipped to [0, 1] (normal brain near "
                    f"{1 / float(self.config.median_scale):.2f}), background 0")
        return (f"per volume, clipped at the {self.config.clip_percentile:g}th percentile inside the brain "
                "and scaled to [0, 1], background 0")
