"""One way to load an mmdiff pipeline: a folder, a Hub repo id, or the published pipeline of an engine.

Each pipeline class names its engine (``MMDiffPipeline.engine == "ldm"``, ``MMGANPipeline.engine
== "gan"``); the class comes from the pipeline's own ``model_index.json``, so nothing is guessed
and a Hub repo loads without being told its engine. ``synthesize``, ``evaluate``, ``downstream``,
``export`` and the CLI all load through :func:`load_pipeline`.
"""

from __future__ import annotations

import os
from pathlib import Path

from diffusers import DiffusionPipeline

from ..resources import DEFAULT_PIPELINES, ENGINES, published_pipeline
from .gan import MMGANPipeline
from .ldm import MMDiffPipeline

PIPELINES = {cls.__name__: cls for cls in (MMDiffPipeline, MMGANPipeline)}


def resolve_source(source: str | os.PathLike | None = None, engine: str | None = None) -> str | Path:
    """What ``source`` names: ``None`` or an engine name (``ldm``, ``gan``, when no such folder exists)
    is the published pipeline of that engine (``None``: of ``engine``, else the LDM); anything else
    is a pipeline folder or a Hub repo id, returned as given."""
    if engine is not None and engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: choose {' or '.join(ENGINES)}")
    if source is None or (str(source) in DEFAULT_PIPELINES and not Path(source).exists()):
        path = published_pipeline((engine or "ldm") if source is None else str(source))
        if not (path / "model_index.json").is_file():
            raise FileNotFoundError(f"no published pipeline at {path}: pass --pipeline PATH_OR_REPO")
        return path
    return Path(source) if Path(source).exists() else str(source)


def pipeline_class(source: str | os.PathLike, **hub_kwargs) -> type[DiffusionPipeline]:
    """The mmdiff pipeline class that ``source``'s ``model_index.json`` names (read offline from the
    Hub cache when ``HF_HUB_OFFLINE`` is set)."""
    path = Path(source)
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} is not a pipeline folder (no model_index.json)")
    try:
        index = DiffusionPipeline.load_config(str(source), **hub_kwargs)
    except OSError as exc:  # not a folder and not a reachable or cached repo
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        hint = ("HF_HUB_OFFLINE is set and it is not in the local Hub cache: download it once online, "
                if offline else "") + "or use the published pipelines that ship with mmdiff (--engine ldm|gan)"
        raise FileNotFoundError(f"cannot load the pipeline {source!s}: not a folder, nor a Hub repo that "
                                f"could be read ({hint})") from exc
    name = index.get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{source} holds a {name!r} pipeline, not an mmdiff one ({', '.join(PIPELINES)})")
    return PIPELINES[name]


def load_pipeline(source: str | os.PathLike | None = None, engine: str | None = None,
                  **kwargs) -> MMDiffPipeline | MMGANPipeline:
    """Load an mmdiff pipeline (see :func:`resolve_source` for ``source``); with both ``source`` and
    ``engine``, the pipeline found must be of that engine. ``kwargs`` go to ``from_pretrained``."""
    source = resolve_source(source, engine)
    hub_kwargs = {k: kwargs[k] for k in ("revision", "token", "cache_dir", "local_files_only") if k in kwargs}
    cls = pipeline_class(source, **hub_kwargs)
    if engine is not None and cls.engine != engine:
        raise ValueError(f"{source} holds an {cls.__name__} (engine {cls.engine}), not the {engine} engine")
    return cls.from_pretrained(source, **kwargs)
