"""Where mmdiff's data files live: the training configs, the model-card template and the
published pipelines.

In the repository they are the top-level ``configs/``, ``model_cards/`` and ``pipelines/``
folders. A wheel carries the same folders as package data (``pyproject.toml`` maps them into the
package as ``mmdiff/configs``, ``mmdiff/model_cards`` and ``mmdiff/published``), read here through
:mod:`importlib.resources`; so an installed mmdiff works offline with its default pipelines. The
packaged copy wins; a source checkout that is not installed falls back to the repository folders.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

#: the package-data name of each resource folder, and the repository folder it is built from
FOLDERS = {"configs": "configs", "model_cards": "model_cards", "published": "pipelines"}
#: the published pipeline of each engine, a folder under ``published``
DEFAULT_PIPELINES = {"ldm": "mmdiff-ldm", "gan": "mmdiff-gan"}
#: the engines, as the pipeline classes name them (``MMDiffPipeline.engine``, ``MMGANPipeline.engine``)
ENGINES = tuple(DEFAULT_PIPELINES)


def resource_dir(name: str) -> Path:
    """The folder of the resource ``name`` (a key of :data:`FOLDERS`)."""
    if name not in FOLDERS:
        raise KeyError(f"unknown resource {name!r}: one of {', '.join(FOLDERS)}")
    packaged = files("mmdiff") / name
    if packaged.is_dir():  # an installed wheel: a real folder next to the modules
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / FOLDERS[name]


def configs_dir() -> Path:
    """The training and evaluation configs (``gan-tiny.yaml``, ``accelerate/...``)."""
    return resource_dir("configs")


def model_card_template() -> Path:
    """The template the model cards are rendered from."""
    return resource_dir("model_cards") / "pipeline.md"


def published_pipeline(engine: str) -> Path:
    """The folder of the published pipeline of ``engine`` (``ldm`` or ``gan``)."""
    if engine not in DEFAULT_PIPELINES:
        raise ValueError(f"unknown engine {engine!r}: choose {' or '.join(DEFAULT_PIPELINES)}")
    return resource_dir("published") / DEFAULT_PIPELINES[engine]
