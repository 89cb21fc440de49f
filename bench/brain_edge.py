"""Where in the brain is a synthetic image wrong? The brain's outermost voxels against the rest.

A skull-stripped brain ends in a thin layer of CSF: bright on T2 and ADC, dark on T1 and FLAIR, where
FLAIR and T1 look like the background outside the brain. A generator that must draw the brain's
outline from the sources cannot see where the brain ends where they are that dark, and may draw the
outermost layer of a T2 or ADC dark; the evaluation (and a user, who gets every brain voxel back)
counts those voxels in full. On held-out cases of a prepared cache, for each task this reports, for
each pipeline and the voxelwise regression, every ``--slice-stride``-th slice, on the cache's scale
(``mmdiff evaluate`` rescales each volume by its own healthy-brain median, so its PSNRs differ a little):

- PSNR over the brain; over its outer ring (voxels within ``--ring`` voxels, in plane, of the mask's
  edge) and over the rest (the interior); the ring's share of the brain's squared error;
- the mean intensity on the ring, synthetic against real;
- on the interior, the spread (synthetic std / real std) and the correlation with the real image, to
  tell a better image from a flatter one (see :mod:`mmdiff.evaluation.protocol`).

    python bench/brain_edge.py PIPELINE [PIPELINE ...] [--data ~/.cache/mmdiff/cpu-v2] \
        [--tasks stroke:flair->adc brats:t1+t2+flair->t1c ...] [--ring 2] [--out bench/results/brain_edge.json]

Default tasks: stroke FLAIR -> ADC (the phantom whose FLAIR is resampled from its own grid, so it
fades before the ADC's brain ends) and one task per real cohort.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

DEFAULT_TASKS = ("stroke:flair->adc", "stroke:flair->dwi", "brats:t1->t2", "brats:t1+t2+flair->t1c",
                 "ms:t1+t2->flair", "ms:t1->t1c", "wml:t1+t2->flair")


def psnr(error: np.ndarray) -> float:
    return float(-10 * np.log10(max(np.mean(error ** 2), 1e-12)))


def scores(synthetic: np.ndarray, real: np.ndarray, brain: np.ndarray, ring: np.ndarray) -> dict:
    error = synthetic - real
    interior = brain & ~ring
    return {"psnr_brain": round(psnr(error[brain]), 2), "psnr_ring": round(psnr(error[ring & brain]), 2),
            "psnr_interior": round(psnr(error[interior]), 2),
            "ring_share_of_error": round(float((error[ring & brain] ** 2).sum() / max((error[brain] ** 2).sum(), 1e-12)), 3),
            "ring_mean": round(float(synthetic[ring & brain].mean()), 3), "ring_mean_real": round(float(real[ring & brain].mean()), 3),
            "spread_interior": round(float(synthetic[interior].std() / max(real[interior].std(), 1e-12)), 3),
            "corr_interior": round(float(np.corrcoef(synthetic[interior], real[interior])[0, 1]), 3)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pipelines", nargs="+")
    parser.add_argument("--data", default="~/.cache/mmdiff/cpu-v2")
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS), help="DATASET:SOURCES->TARGET")
    parser.add_argument("--ring", type=int, default=2, help="ring width in voxels (in plane)")
    parser.add_argument("--slice-stride", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmdiff.evaluation.protocol import PipelineMethod, Task, VoxelwiseRegression, load_cases
    from mmdiff.pipelines.loading import load_pipeline

    cache = Path(args.data).expanduser()
    methods = [PipelineMethod(load_pipeline(path), Path(path).name) for path in args.pipelines]
    methods.append(VoxelwiseRegression(cache))
    rows = []
    for spec in args.tasks:
        dataset, task_name = spec.split(":")
        sources, target = task_name.split("->")
        task = Task(tuple(sources.split("+")), target)
        for case in load_cases(cache, "test", datasets=[dataset], slice_stride=args.slice_stride):
            if not set(task.sources) | {target} <= set(case.images):
                continue
            brain = np.asarray(case.brain, dtype=bool)
            scored = np.zeros_like(brain)
            scored[..., case.scored] = True
            inner = ndimage.binary_erosion(brain, structure=np.ones((3, 3, 1), bool), iterations=args.ring)
            ring = brain & ~inner
            real = np.asarray(case.images[target], dtype=np.float32)
            for method in methods:
                synthetic = method(case, task)[0]
                row = {"dataset": dataset, "task": task_name, "case": case.case_id, "method": method.name,
                       **scores(synthetic, real, brain & scored, ring & scored)}
                rows.append(row)
                print("  ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "ring": args.ring,
              "slice_stride": args.slice_stride, "pipelines": args.pipelines, "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
