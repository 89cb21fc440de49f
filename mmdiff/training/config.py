"""Training configs: YAML files with ``key.sub=value`` overrides from the command line."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml

from ..resources import configs_dir

CONFIG_DIR = configs_dir()
STAGES = ("vae", "ldm", "gan")


class ConfigError(ValueError):
    """A config that names something that does not exist or does not fit."""


def find_config(name: str | os.PathLike) -> Path:
    """A config path, or a bare name (``ldm-tiny``) looked up in mmdiff's ``configs/`` (package data)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / str(name)):
        if candidate.is_file():
            return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")) if CONFIG_DIR.is_dir() else []
    raise ConfigError(f"no config {name!r}: give a YAML path or one of {', '.join(known) or '(none found)'}")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.lr=1e-4`` -> (["train", "lr"], 0.0001); the value is parsed as YAML."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not KEY=VALUE (e.g. train.batch_size=8)")
    return key.split("."), yaml.safe_load(value)


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """A copy of ``config`` with overrides applied; an unknown key is an error naming the known ones."""
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for depth, key in enumerate(keys):
            if not isinstance(node, dict) or key not in node:
                where = ".".join(keys[:depth]) or "the top level"
                known = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise ConfigError(f"unknown config key {'.'.join(keys)!r}: {where} has {known}")
            if depth == len(keys) - 1:
                node[key] = value
            else:
                node = node[key]
    return config


def load_config(name: str | os.PathLike, overrides: list[str] | None = None, require_stage: bool = True) -> dict:
    """Load a YAML config (``base:`` names a config it extends) and apply overrides.

    ``require_stage=False`` also accepts a config without a training stage (the ``data-*`` ones).
    """
    path = find_config(name)
    config = _load_with_bases(path)
    if overrides:
        config = apply_overrides(config, overrides)
    if require_stage and config.get("stage") not in STAGES:
        raise ConfigError(f"{path}: stage must be one of {', '.join(STAGES)}, got {config.get('stage')!r}")
    return config


def _load_with_bases(path: Path) -> dict:
    config = yaml.safe_load(path.read_text()) or {}
    base = config.pop("base", None)
    if base is None:
        return config
    return _merge(_load_with_bases(find_config(path.parent / base if not Path(base).is_absolute() else base)), config)


def _merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out
