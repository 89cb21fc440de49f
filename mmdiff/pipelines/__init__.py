"""diffusers pipelines for mmdiff: :class:`MMDiffPipeline` (latent diffusion) and :class:`MMGANPipeline`.

Loading with ``DiffusionPipeline.from_pretrained``
-------------------------------------------------
``save_pretrained`` writes ``"_class_name": "MMDiffPipeline"`` and the components as
``["mmdiff.models.unet", "ResidualUNet"]``, ``["mmdiff.models.wavelet", "HaarWavelet"]``, ... In
diffusers 0.42, ``MMDiffPipeline.from_pretrained`` loads that as is. The generic
``DiffusionPipeline.from_pretrained`` looks the class up as ``getattr(diffusers, _class_name)``
(``pipeline_loading_utils._get_pipeline_class``), and a component's module only in ``sys.modules``
(``_get_library_or_raise``); diffusers has no entry-point or plugin lookup. What else was weighed:

- ``_class_name: ["<file>", "MMDiffPipeline"]`` loads ``<file>.py`` from the repo as remote code: it
  needs remote code switched on at every load, and a re-save drops the file.
- a ``.pth`` file that patches diffusers at interpreter start: it would run in every Python process
  of the environment (pip, training workers), would have to hook diffusers' private ``_LazyModule``
  through an import hook to stay cheap, can break interpreter start-up, and setuptools cannot ship
  a ``.pth`` from ``pyproject.toml`` without custom build code.

So ``import mmdiff`` (see :mod:`mmdiff`) gives the ``diffusers`` module a fallback for the names
``MMDiffPipeline`` and ``MMGANPipeline`` (unless diffusers has a class of that name) that imports
this package, and with it the component modules, on first use; it imports neither torch nor
diffusers itself. ``DiffusionPipeline.from_pretrained(path)`` then returns the mmdiff pipeline
with remote code off.

Each pipeline class names its engine (``MMDiffPipeline.engine == "ldm"``, ``MMGANPipeline.engine
== "gan"``); :func:`load_pipeline` loads a folder, a Hub repo or a published pipeline as the class
its ``model_index.json`` names.
"""

from .common import MMDiffPipelineOutput, prepare_inputs, resolve_dataset_id
from .gan import MMGANPipeline
from .ldm import SCHEDULERS, MMDiffPipeline, MMDiffSamplesOutput, denoise, sample_residuals, use_scheduler
from .loading import ENGINES, PIPELINES, load_pipeline, resolve_source
from .precision import PRECISIONS, resolve_precision

__all__ = ["ENGINES", "PIPELINES", "PRECISIONS", "SCHEDULERS", "MMDiffPipeline", "MMDiffPipelineOutput",
           "MMDiffSamplesOutput", "MMGANPipeline", "denoise", "load_pipeline", "prepare_inputs", "resolve_dataset_id",
           "resolve_precision", "resolve_source", "sample_residuals", "use_scheduler"]
