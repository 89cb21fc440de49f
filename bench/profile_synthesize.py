"""Where the time of ``mmdiff synthesize`` goes, end to end, on one volume.

Runs :func:`mmdiff.synthesize.synthesize` (the CLI's own function: load the pipeline, read the NIfTI
files, brain mask, normalisation, the network over the brain slices, write-back and gzip) under
``cProfile`` and reports the wall time of the whole call and of each stage, read from the profile by
the function that owns the stage (nothing in mmdiff is instrumented for this):

    python bench/profile_synthesize.py [--pipeline pipelines/mmdiff-gan] [--threads 2] [--repeat 2]
        [--case ../shared/data/brats2018-sample/Brats18_CBICA_AME_1] [--out bench/results/profile.json]

Default case: a real BraTS 2018 volume (240 x 240 x 155), T1 + T2 + FLAIR in, every other sequence
of the model out (T1C, DWI, ADC for the six-sequence models); a phantom glioma case where
``../shared/data`` is absent. The first call of a process pays one-off costs (imports, weights,
oneDNN kernel selection); ``--repeat`` runs it again in the same process and reports each run.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT / ".." / "shared" / "data" / "brats2018-sample" / "Brats18_CBICA_AME_1"
SOURCES = ("t1", "t2", "flair")

# stage -> (file suffix, function name) whose cumulative time is the stage's
STAGES = {
    "load pipeline": ("synthesize.py", "load_pipeline"),
    "read NIfTI": ("io.py", "load_volume"),
    "brain mask": ("prepare.py", "derive_brain_mask"),
    "normalise": ("preprocessing.py", "normalise"),
    "network": ("module.py", "_call_impl"),
    "write NIfTI + sidecars": ("io.py", "save_nifti"),
}


def case_inputs(case: Path | None, tmp: Path) -> tuple[dict[str, str], str]:
    if case is not None and case.is_dir():
        return {m: str(next(case.glob(f"*_{m}.nii.gz"))) for m in SOURCES}, f"{case.name} (real BraTS 2018)"
    from mmdiff.data.phantom import write_cohorts

    write_cohorts(tmp / "phantom", cases=1, seed=0, cohorts=["glioma"], spacing=1.0, overwrite=True)
    folder = next((tmp / "phantom" / "glioma").iterdir())
    names = {"t1": "t1n", "t2": "t2w", "flair": "t2f"}
    return {m: str(next(folder.glob(f"*-{names[m]}.nii.gz"))) for m in SOURCES}, "phantom glioma case 0"


def stage_times(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats
    times = {}
    for stage, (suffix, name) in STAGES.items():
        found = [value for (file, _, function), value in stats.items() if file.endswith(suffix) and function == name]
        if stage == "network":  # the outermost module call: the generator (or the UNet) itself
            times[stage] = max((value[3] for value in found), default=0.0)
        else:
            times[stage] = sum(value[3] for value in found)
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(ROOT / "pipelines" / "mmdiff-gan"))
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from mmdiff.synthesize import synthesize

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs, description = case_inputs(args.case, Path(tmp))
        for run in range(args.repeat):
            profile = cProfile.Profile()
            started = time.perf_counter()
            profile.enable()
            written = synthesize(inputs, Path(tmp) / f"out{run}", pipeline_source=args.pipeline, engine="gan",
                                 dataset="brats", batch_size=args.batch_size)
            profile.disable()
            total = time.perf_counter() - started
            stages = stage_times(profile)
            stages["other"] = max(0.0, total - sum(stages.values()))
            runs.append({"run": run + 1, "total_s": round(total, 2), "targets": sorted(written),
                         "stages_s": {k: round(v, 2) for k, v in stages.items()}})
            print(f"run {run + 1}: {total:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in stages.items()))
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "threads": args.threads, "pipeline": args.pipeline, "case": description,
              "batch_size": args.batch_size, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
