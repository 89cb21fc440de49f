"""mmdiff: fill in missing MRI sequences across heterogeneous datasets.

``import mmdiff`` is enough for ``diffusers.DiffusionPipeline.from_pretrained`` to load mmdiff
pipelines, and it stays cheap: it imports neither torch nor diffusers. diffusers looks a
pipeline class up as an attribute of its own module (``getattr(diffusers, "MMGANPipeline")``), so
this package gives the ``diffusers`` module (when it is, or once it gets, imported) a fallback for
the names of mmdiff's pipelines that imports :mod:`mmdiff.pipelines` on first use. A class that
diffusers has itself always wins. Remote code stays off.
"""

from __future__ import annotations

import sys

__version__ = "0.1.0"

from .modalities import MODALITIES  # noqa: E402

__all__ = ["MODALITIES", "PIPELINE_CLASSES", "__version__"]

#: the pipeline classes in :mod:`mmdiff.pipelines` that ``getattr(diffusers, name)`` finds
PIPELINE_CLASSES = ("MMDiffPipeline", "MMGANPipeline")


def _add_pipeline_fallback(module) -> None:
    """Give the ``diffusers`` module object a ``__getattr__`` fallback for :data:`PIPELINE_CLASSES`."""
    base = type(module)
    if getattr(base, "_mmdiff_fallback", False):
        return

    class DiffusersWithMMDiff(base):
        _mmdiff_fallback = True

        def __getattr__(self, name):
            own = getattr(base, "__getattr__", None)
            try:
                if own is None:
                    raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
                return own(self, name)
            except AttributeError:
                if name not in PIPELINE_CLASSES:
                    raise
            from . import pipelines

            return getattr(pipelines, name)

    DiffusersWithMMDiff.__name__ = DiffusersWithMMDiff.__qualname__ = base.__name__
    module.__class__ = DiffusersWithMMDiff


class _DiffusersImportHook:
    """A ``sys.meta_path`` finder that adds the fallback right after ``diffusers`` is first imported,
    then removes itself; it changes nothing else about the import."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "diffusers":
            return None
        import importlib.util

        if cls in sys.meta_path:
            sys.meta_path.remove(cls)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_add_fallback(module):
            exec_module(module)
            _add_pipeline_fallback(sys.modules.get(fullname, module))  # diffusers replaces itself by a lazy module

        spec.loader.exec_module = exec_and_add_fallback
        return spec


if "diffusers" in sys.modules:
    _add_pipeline_fallback(sys.modules["diffusers"])
elif _DiffusersImportHook not in sys.meta_path:
    sys.meta_path.insert(0, _DiffusersImportHook)
