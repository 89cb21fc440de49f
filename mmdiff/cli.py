"""The ``mmdiff`` command: each step of the workflow is a subcommand.

    mmdiff quickstart                      a phantom case, its volumes and a montage
    mmdiff phantom OUT --cases N --seed S  the four phantom cohorts, in their real layouts
    mmdiff scan DIR --out manifest.csv     read a BraTS / BIDS / ISLES'22 folder into a manifest
    mmdiff prepare SOURCES --out CACHE     sources -> slice cache with a case-level split
    mmdiff train --config gan-cpu          train a stage (as `accelerate launch -m mmdiff.train`)
    mmdiff synthesize --t1 A --flair B --out DIR   the missing sequences of one exam
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__


def _source(text: str) -> tuple[str | None, Path]:
    """``PATH`` or ``NAME=PATH`` (NAME names the dataset)."""
    name, sep, path = text.partition("=")
    if sep and name and not Path(text).exists():
        return name, Path(path)
    return None, Path(text)


def cmd_phantom(args) -> int:
    from .data.layouts import describe
    from .data.phantom import COHORTS, write_cohorts

    unknown = [c for c in args.cohorts or [] if c not in COHORTS]
    if unknown:
        raise SystemExit(f"unknown cohort(s) {unknown}: known cohorts are {', '.join(COHORTS)}")
    cases = write_cohorts(args.out, cases=args.cases, seed=args.seed, cohorts=args.cohorts,
                          spacing=args.spacing, progress=not args.quiet, overwrite=args.overwrite)
    print(describe(cases))
    print(f"manifest: {Path(args.out) / 'manifest.csv'}")
    return 0


def cmd_scan(args) -> int:
    from .data.layouts import describe, detect_layout, scan
    from .data.manifest import write_manifest

    layout = args.layout or detect_layout(args.dir)
    cases = scan(args.dir, dataset=args.dataset, layout=layout)
    print(f"layout: {layout}")
    print(describe(cases))
    if args.out:
        write_manifest(cases, args.out, relative=not args.absolute)
        print(f"manifest: {args.out}")
    return 0


def cmd_prepare(args) -> int:
    from .data.layouts import describe, scan
    from .data.prepare import PrepareConfig, format_summary, prepare

    spacing = args.spacing[0] if len(args.spacing) == 1 else tuple(args.spacing)
    if len(args.spacing) not in (1, 3):
        raise SystemExit("--spacing takes one value (isotropic) or three")
    config = PrepareConfig(size=args.size, spacing=spacing, clip_percentile=args.clip_percentile,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                           **({"modalities": args.modalities} if args.modalities else {}))
    cases = []
    for text in args.sources:
        name, path = _source(text)
        cases += scan(path, dataset=name)
    print(describe(cases))
    summary = prepare(cases, args.out, config, num_workers=args.workers, progress=not args.quiet)
    print(format_summary(summary))
    print(f"cache: {args.out}")
    return 0


def cmd_quickstart(args) -> int:
    from .data.phantom import simulate_case, write_case
    from .viz import case_montage

    out = Path(args.out)
    case = simulate_case("glioma", 0, seed=args.seed)
    written = write_case(case, out, overwrite=args.overwrite)
    montage = case_montage(case.images, out / "montage.png", seg=case.seg, views=("axial", "coronal"),
                           title=f"{case.case_id}: simulated {case.dataset} phantom", overwrite=args.overwrite)
    print(f"phantom case {case.case_id} ({', '.join(case.images)}) written under {out}")
    for kind, path in written.files.items():
        print(f"  {kind:6s} {path}")
    print(f"montage: {montage}")
    return 0


def cmd_synthesize(args) -> int:
    from .synthesize import synthesize

    inputs = {m: getattr(args, m) for m in ("t1", "t2", "t1c", "flair", "dwi", "adc") if getattr(args, m)}
    written = synthesize(inputs, args.out, pipeline_source=args.pipeline, engine=args.engine, dataset=args.dataset,
                         targets=args.targets, steps=args.steps, samples=args.samples, seed=args.seed,
                         brain_mask=args.brain_mask, batch_size=args.batch_size, overwrite=args.overwrite)
    for name, path in written.items():
        print(f"{name:18s} {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdiff", description="Fill in missing MRI sequences.")
    parser.add_argument("--version", action="version", version=f"mmdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="make a phantom case and write its volumes and a montage")
    p.add_argument("--out", default="mmdiff-quickstart", help="output folder (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier run")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("phantom", help="generate the four phantom cohorts in their real layouts")
    p.add_argument("out", help="output folder")
    p.add_argument("--cases", type=int, default=4, help="cases per cohort (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cohorts", nargs="+", help="only these cohorts (glioma immune bratslike stroke)")
    p.add_argument("--spacing", type=float, default=1.0,
                   help="multiplies every cohort's voxel size (default: %(default)s; 3 makes small, fast phantoms)")
    p.add_argument("--overwrite", action="store_true", help="replace files from an earlier run")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("scan", help="read a dataset folder (BraTS, BIDS/ISLES'22, manifest) into a manifest")
    p.add_argument("dir", help="dataset folder or manifest.csv")
    p.add_argument("--dataset", help="dataset name (default: the folder's name)")
    p.add_argument("--layout", choices=["brats2018", "brats2023", "bids", "manifest"], help="skip detection")
    p.add_argument("--out", help="write the manifest CSV here")
    p.add_argument("--absolute", action="store_true", help="write absolute paths")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("prepare", help="turn sources into a slice cache for training and evaluation")
    p.add_argument("sources", nargs="+", metavar="[NAME=]PATH",
                   help="dataset folders or manifests; NAME= names the dataset (default: folder name / manifest)")
    p.add_argument("--out", required=True, help="cache folder (re-runs skip finished cases)")
    p.add_argument("--size", type=int, default=192, help="in-plane size in voxels (default: %(default)s)")
    p.add_argument("--spacing", type=float, nargs="+", default=[1.0], help="voxel size in mm (default: 1)")
    p.add_argument("--modalities", nargs="+", help="modality list (default: t1 t2 t1c flair dwi adc)")
    p.add_argument("--clip-percentile", type=float, default=99.5)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("synthesize", help="synthesize the missing sequences of one exam (NIfTI in, NIfTI out)")
    for m in ("t1", "t2", "t1c", "flair", "dwi", "adc"):
        p.add_argument(f"--{m}", metavar="NIFTI", help=f"the {m.upper()} volume, if the exam has one")
    p.add_argument("--dataset", help="the site's dataset name (unknown or none: the null dataset, for unseen sites)")
    p.add_argument("--out", required=True, help="output folder: <target>_synthetic.nii.gz and JSON sidecars")
    p.add_argument("--engine", choices=["ldm", "gan"], default="ldm", help="latent diffusion or the one-step GAN")
    p.add_argument("--pipeline", help="pipeline folder or Hub repo id (default: the published one in pipelines/)")
    p.add_argument("--targets", nargs="+", help="sequences to make (default: every one not given)")
    p.add_argument("--steps", type=int, default=20, help="diffusion steps (ldm; default: %(default)s)")
    p.add_argument("--samples", type=int, default=1, help="samples per slice; >1 also writes uncertainty maps (ldm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--brain-mask", metavar="NIFTI", help="brain mask on the inputs' grid (default: derived; "
                                                         "needed for heads that are not skull-stripped)")
    p.add_argument("--batch-size", type=int, default=8, help="axial slices per forward pass")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs")
    p.set_defaults(func=cmd_synthesize)

    # listed for --help; main() hands `mmdiff train ...` to mmdiff.train before parsing
    sub.add_parser("train", help="train a stage (vae, ldm, gan); see `mmdiff train --help`")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:
        from .train import main as train_main

        return train_main(argv[1:], prog="mmdiff train")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        # the error types mmdiff raises for bad input: say what is wrong, no traceback
        print(f"mmdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
