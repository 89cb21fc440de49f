"""Where the time of ``mmdiff synthesize`` goes, end to end, on one volume.

Runs :func:`mmdiff.synthesize.synthesize` (the CLI's own function: load the pipeline, read and check
the NIfTI files, brain mask, normalisation, the network over the brain slices, write-back and gzip)
and reports the wall time of the whole call and of each stage. The stages are timed by wrapping, for
the run only, the function that owns each (nothing in mmdiff is instrumented for this; reading and
writing run in threads, so they are timed where the main thread waits for them):

    python bench/profile_synthesize.py [--pipeline pipelines/mmdiff-gan] [--threads 2] [--repeat 2] [--targets t1c dwi adc]
        [--case ../shared/data/brats2018-sample/Brats18_CBICA_AME_1] [--out bench/results/profile.json]

Default case: a real BraTS 2018 volume (240 x 240 x 155), T1 + T2 + FLAIR in, every other sequence
out (``--targets``, default T1C, DWI, ADC); a phantom glioma case where
``../shared/data`` is absent. The first call of a process pays one-off costs (imports, weights,
oneDNN kernel selection); ``--repeat`` runs it again in the same process and reports each run.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CASE = ROOT / ".." / "shared" / "data" / "brats2018-sample" / "Brats18_CBICA_AME_1"
SOURCES = ("t1", "t2", "flair")

# "pipeline call" holds brain mask, normalise and network; "write outputs" is what is left of the run
STAGES = ("load pipeline", "read + check inputs", "pipeline call", "brain mask", "normalise", "network")


@contextlib.contextmanager
def timed_stages(times: dict[str, float]):
    """Wrap the functions that own the stages; their wall times add up in ``times``."""
    import mmdiff.pipelines
    import mmdiff.pipelines.common
    import mmdiff.synthesize
    from mmdiff.data.preprocessing import MRIPreprocessor
    from mmdiff.models.gan import MultiModalGenerator
    from mmdiff.pipelines import MMDiffPipeline, MMGANPipeline

    def wrap(owner, name, stage):
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times[stage] += time.perf_counter() - started
        setattr(owner, name, timed)
        return owner, name, original

    patches = [wrap(mmdiff.pipelines, "load_pipeline", "load pipeline"),
               wrap(mmdiff.synthesize, "check_input_files", "read + check inputs"),
               wrap(mmdiff.pipelines.common, "derive_brain_mask", "brain mask"),
               wrap(MRIPreprocessor, "normalise", "normalise"),
               wrap(MultiModalGenerator, "forward", "network"),
               wrap(MMGANPipeline, "__call__", "pipeline call"),
               wrap(MMDiffPipeline, "__call__", "pipeline call")]
    try:
        yield
    finally:
        for owner, name, original in reversed(patches):
            setattr(owner, name, original)


def case_inputs(case: Path | None, tmp: Path) -> tuple[dict[str, str], str]:
    if case is not None and case.is_dir():
        return {m: str(next(case.glob(f"*_{m}.nii.gz"))) for m in SOURCES}, f"{case.name} (real BraTS 2018)"
    from mmdiff.data.phantom import write_cohorts

    write_cohorts(tmp / "phantom", cases=1, seed=0, cohorts=["glioma"], spacing=1.0, overwrite=True)
    folder = next((tmp / "phantom" / "glioma").iterdir())
    names = {"t1": "t1n", "t2": "t2w", "flair": "t2f"}
    return {m: str(next(folder.glob(f"*-{names[m]}.nii.gz"))) for m in SOURCES}, "phantom glioma case 0"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=str(ROOT / "pipelines" / "mmdiff-gan"))
    parser.add_argument("--case", type=Path, default=DEFAULT_CASE)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["t1c", "dwi", "adc"], help="default: the issue's 3 targets")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    import mmdiff.pipelines  # noqa: F401  imports are not a stage here (python -X importtime measures them);
    from mmdiff.synthesize import synthesize  # synthesize() imports torch and diffusers on first use

    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        inputs, description = case_inputs(args.case, Path(tmp))
        for run in range(args.repeat):
            times = dict.fromkeys(STAGES, 0.0)
            started = time.perf_counter()
            with timed_stages(times):
                written = synthesize(inputs, Path(tmp) / f"out{run}", pipeline_source=args.pipeline,
                                     dataset="brats", targets=args.targets, batch_size=args.batch_size)
            total = time.perf_counter() - started
            times["write outputs"] = max(0.0, total - times["load pipeline"] - times["read + check inputs"]
                                         - times["pipeline call"])
            runs.append({"run": run + 1, "total_s": round(total, 2), "targets": sorted(written),
                         "stages_s": {k: round(v, 2) for k, v in times.items()}})
            print(f"run {run + 1}: {total:.2f} s  " + "  ".join(f"{k} {v:.2f}" for k, v in times.items()))
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": platform.processor() or
              platform.machine(), "threads": args.threads, "pipeline": args.pipeline, "case": description,
              "batch_size": args.batch_size, "runs": runs}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
