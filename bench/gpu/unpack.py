"""Rebuild a normal mmdiff slice cache from a pack of ``bench/gpu/pack.py`` (runs on the device).

::

    python bench/gpu/unpack.py --pack .gpu --cache /tmp/mmdiff-gpu/cache [--workers 16] [--no-phantoms]

1. The source cache's ``cache.json`` and ``splits.json`` are written as they were (so dataset ids and
   the case splits are the same as here), and every packed real case into its folder, in the layout
   of :mod:`mmdiff.data.cache` (images float16 from the uint8 quantisation, brain mask, seg,
   ``meta.json`` last).
2. The phantom cohorts of the pack's recipe are simulated in parallel (the same seed gives the same
   bytes as here) and prepared into the same cache with :func:`mmdiff.data.prepare.prepare`, which
   then writes ``index.json`` over every finished case, the unpacked ones included. With
   ``--no-phantoms`` it is called with no cases, only to write the index.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE)]

from pack import decode_case  # noqa: E402

from mmdiff.data.cache import (BRAIN_MASK, CACHE_JSON, IMAGES, META, SEG, SPLITS_JSON,  # noqa: E402
                               case_dir, describe)
from mmdiff.io import atomic_dir, write_json  # noqa: E402


def prepare_config(cache_json: dict):
    """The source cache's :class:`~mmdiff.data.prepare.PrepareConfig` (a cache is only extended with it)."""
    from mmdiff.data.prepare import PrepareConfig

    names = {f.name for f in fields(PrepareConfig)}
    return PrepareConfig(**{k: v for k, v in cache_json["config"].items() if k in names})


def write_cases(pack_dir: Path, record: dict, cache: Path) -> int:
    """The packed cases into ``cache``; returns their number."""
    cache.mkdir(parents=True, exist_ok=True)
    if (cache / CACHE_JSON).exists():
        raise SystemExit(f"{cache} already holds a cache: unpack into a new folder")
    write_json(cache / CACHE_JSON, record["cache_json"])
    write_json(cache / SPLITS_JSON, record["splits"])
    for entry in record["cases"]:
        images, brain, seg = decode_case(pack_dir / entry["file"], entry)
        with atomic_dir(case_dir(cache, entry["dataset"], entry["case_id"])) as tmp:
            np.save(tmp / IMAGES, images)
            np.save(tmp / BRAIN_MASK, brain)
            np.save(tmp / SEG, seg)
            write_json(tmp / META, entry["meta"])
    return len(record["cases"])


def _phantom_case(job):
    from mmdiff.data.phantom import simulate_case, write_case

    cohort, index, seed, spacing, out = job
    return write_case(simulate_case(cohort, index, seed=seed, spacing=spacing), out, overwrite=True)


def write_phantoms(recipe: dict, out: Path, workers: int) -> Path:
    """``mmdiff phantom``'s cohorts, one process per case; returns the manifest."""
    from mmdiff.data.manifest import write_manifest

    jobs = [(c, i, recipe["seed"], recipe["spacing"], out) for c in recipe["cohorts"] for i in range(recipe["cases"])]
    out.mkdir(parents=True, exist_ok=True)
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            written = list(pool.map(_phantom_case, jobs))  # in job order: the manifest of write_cohorts
    else:
        written = [_phantom_case(j) for j in jobs]
    return write_manifest(written, out / "manifest.csv")


def unpack(pack_dir: Path, cache: Path, phantoms: bool = True, workers: int = 1,
           phantom_dir: Path | None = None, progress: bool = False) -> dict:
    from mmdiff.data.manifest import read_manifest
    from mmdiff.data.prepare import format_summary, prepare

    pack_dir, cache = Path(pack_dir), Path(cache)
    record = json.loads((pack_dir / "pack.json").read_text())
    t0 = time.time()
    n = write_cases(pack_dir, record, cache)
    print(f"unpacked {n} real case(s) into {cache} in {time.time() - t0:.1f} s", flush=True)
    cases = []
    recipe = record["phantoms"]
    if phantoms and recipe["cohorts"] and recipe["cases"]:
        t0 = time.time()
        manifest = write_phantoms(recipe, Path(phantom_dir or cache / "sources" / "phantoms"), workers)
        cases = read_manifest(manifest)
        print(f"simulated {len(cases)} phantom case(s) in {time.time() - t0:.1f} s", flush=True)
    t0 = time.time()
    summary = prepare(cases, cache, prepare_config(record["cache_json"]), num_workers=workers, progress=progress)
    print(format_summary(summary))
    print(f"prepared in {time.time() - t0:.1f} s", flush=True)
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Rebuild a slice cache from a bench/gpu pack (+ the phantom cohorts).")
    p.add_argument("--pack", default=".gpu", help="pack folder (default: %(default)s)")
    p.add_argument("--cache", required=True, help="new cache folder")
    p.add_argument("--workers", type=int, default=1, help="processes for the phantoms and their preparation")
    p.add_argument("--no-phantoms", action="store_true", help="only the packed real cases")
    p.add_argument("--phantom-dir", help="where the phantom NIfTI go (default: CACHE/sources/phantoms)")
    args = p.parse_args(argv)
    unpack(Path(args.pack), Path(args.cache), phantoms=not args.no_phantoms, workers=args.workers,
           phantom_dir=Path(args.phantom_dir) if args.phantom_dir else None)
    print(json.dumps(describe(args.cache)["datasets"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
