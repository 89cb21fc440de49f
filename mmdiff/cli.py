"""The ``mmdiff`` command: each step of the workflow is a subcommand.

    mmdiff quickstart                      hide sequences of a phantom exam, synthesize them, score them
    mmdiff phantom OUT --cases N --seed S  the four phantom cohorts, in their real layouts
    mmdiff scan DIR --out manifest.csv     read a BraTS / BIDS / ISLES'22 folder into a manifest
    mmdiff prepare SOURCES --out CACHE     sources -> slice cache with a case-level split
    mmdiff train --config gan-cpu          train a stage (as `accelerate launch -m mmdiff.train`)
    mmdiff synthesize --t1 A --flair B --out DIR   the missing sequences of one exam
    mmdiff evaluate --pipeline P --data CACHE      scores on held-out cases, with baselines
    mmdiff export RUN_DIR OUT                      a training run -> pipeline folder + model card
    mmdiff push OUT --repo-id ORG/NAME             upload a pipeline folder to the Hub
    mmdiff demo                                    the browser demo (gradio) on http://127.0.0.1:7860
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .modalities import KNOWN_MODALITIES

#: the names of :data:`mmdiff.pipelines.SCHEDULERS`, here so the parser needs no diffusers import
SCHEDULER_NAMES = ("dpm++", "unipc", "ddim", "euler", "ddpm")
#: :data:`mmdiff.pipelines.PRECISIONS`, here for the same reason
PRECISION_NAMES = ("auto", "float32", "bfloat16")


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
                           normalisation=args.normalisation, median_scale=args.median_scale,
                           val_fraction=args.val_fraction, test_fraction=args.test_fraction, seed=args.seed,
                           **({"modalities": args.modalities} if args.modalities else {}))
    cases = []
    for text in args.sources:
        name, path = _source(text)
        cases += scan(path, dataset=name)
    mask_labels = dict(text.partition("=")[::2] for text in args.mask_labels)
    datasets = list(dict.fromkeys(case.dataset for case in cases))
    unknown = sorted(name for name in mask_labels if name not in datasets)
    if unknown:
        raise ValueError(f"--mask-labels takes NAME=CONVENTION for a dataset being prepared: no dataset named "
                         f"{', '.join(repr(n) for n in unknown)} (datasets: {', '.join(datasets)})")
    print(describe(cases))
    summary = prepare(cases, args.out, config, num_workers=args.workers, progress=not args.quiet,
                      mask_labels=mask_labels)
    print(format_summary(summary))
    print(f"cache: {args.out}")
    return 0


def cmd_quickstart(args) -> int:
    from .quickstart import quickstart

    result = quickstart(args.out, hide=args.hide, engines=args.engines, steps=args.steps, seed=args.seed,
                        overwrite=args.overwrite)
    print(f"phantom case {result['case']} under {Path(args.out) / 'phantom'}")
    for engine, files in result["files"].items():
        for name, path in files.items():
            print(f"  {engine:4s} {name:18s} {path}")
    print(Path(result["metrics"]).read_text())
    print(f"montage: {result['montage']}")
    return 0


def cmd_synthesize(args) -> int:
    from .synthesize import CASES_RECORD, synthesize, synthesize_cases

    inputs = {m: getattr(args, m) for m in KNOWN_MODALITIES if getattr(args, m)}
    if args.cases:
        if inputs or args.brain_mask:
            raise ValueError("--cases reads each case's files (and brain mask) from the folder or manifest: "
                             "drop the --t1/--t2/.../--brain-mask files, or drop --cases")
        record = synthesize_cases(args.cases, args.out, pipeline_source=args.pipeline, engine=args.engine,
                                  dataset=args.dataset, targets=args.targets, steps=args.steps,
                                  scheduler=args.scheduler, samples=args.samples, seed=args.seed,
                                  batch_size=args.batch_size, precision=args.precision,
                                  flip_average=args.flip_average, overwrite=args.overwrite)
        summary = record["summary"]
        print(", ".join(f"{n} {s}" for s, n in summary.items()) + f"; record: {Path(args.out) / CASES_RECORD}")
        for entry in record["cases"]:
            if entry["status"] == "failed":
                print(f"failed: {entry['case_id']}: {entry['error']}", file=sys.stderr)
        return 1 if summary["failed"] else 0
    written = synthesize(inputs, args.out, pipeline_source=args.pipeline, engine=args.engine, dataset=args.dataset,
                         targets=args.targets, steps=args.steps, scheduler=args.scheduler, samples=args.samples,
                         seed=args.seed,
                         brain_mask=args.brain_mask, batch_size=args.batch_size, precision=args.precision,
                         flip_average=args.flip_average, overwrite=args.overwrite)
    for name, path in written.items():
        print(f"{name:18s} {path}")
    return 0


def _evaluation_data(text: str) -> Path:
    """A prepared cache folder, or a config name (``cpu``, ``data-tiny``...) whose cache is built if needed."""
    if Path(text).expanduser().is_dir():
        return Path(text).expanduser()
    from .training.config import load_config
    from .training.data import ensure_cache

    name = text if text.startswith("data-") else f"data-{text}"
    try:
        config = load_config(name, require_stage=False)
    except (ValueError, FileNotFoundError) as exc:
        raise ValueError(f"--data {text} is neither a prepared cache folder nor a data config ({exc})") from exc
    if "data" not in config:
        raise ValueError(f"--data {text}: the config {name} has no data section")
    return ensure_cache(config["data"])


def _named_pipeline(source: str):
    """``(source, pipeline)`` for ``ldm``/``gan`` (the published ones), a folder or a Hub repo; no progress bars."""
    from .pipelines import load_pipeline, resolve_source
    from .validation import check_pipeline_source

    source = resolve_source(source)
    check_pipeline_source(source)  # a broken or foreign folder: one line before anything loads
    pipe = load_pipeline(source)
    pipe.set_progress_bar_config(disable=True)
    return Path(str(source)), pipe


def method_names(sources: list[str]) -> list[str]:
    """The name each pipeline's rows get in an evaluation: its folder's name, or, where folders share
    one (``pipelines/mmdiff-gan`` beside ``runs/new/mmdiff-gan``), the last two parts of each of those
    paths; the same pipeline given twice is an error. Rows of two pipelines never share a name."""
    from .pipelines import resolve_source

    paths = [Path(str(resolve_source(source))) for source in sources]
    names = [path.name for path in paths]
    names = [name if names.count(name) == 1 else "/".join(path.parts[-2:]) for name, path in zip(names, paths)]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"--pipeline names the same pipeline more than once ({', '.join(repeated)}): give each once")
    return names


def cmd_evaluate(args) -> int:
    from .evaluation.protocol import BASELINES, PipelineMethod, Task, check_gamma
    from .evaluation.report import evaluate

    check_gamma(args.source_gamma)  # before any pipeline loads
    names = method_names(args.pipeline or [])  # likewise
    cache = _evaluation_data(args.data)
    methods = []
    for source, label in zip(args.pipeline or [], names):
        _, pipe = _named_pipeline(source)
        if pipe.engine == "ldm":  # diffusion: one method per scheduler and step count
            settings = [(scheduler, steps) for scheduler in args.scheduler or [None] for steps in args.steps or [None]]
            variants = [(label if len(settings) == 1 else f"{label} ({scheduler or 'default'}, "
                         f"{steps or 'default'} steps)", {"scheduler": scheduler, "steps": steps})
                        for scheduler, steps in settings]
        else:  # the GAN as is, and with --flip-average looking twice too
            variants = [(label, {})] + ([(f"{label} (flip-averaged)", {"flip_average": True})]
                                            if args.flip_average else [])
        if args.unseen_site:  # each also as a scan from a site the model does not know gets it
            variants += [(f"{name} (unseen site)", setting | {"unseen_site": True}) for name, setting in variants]
        for name, setting in variants:
            methods.append(PipelineMethod(pipe, name=name, samples=args.samples, seed=args.seed,
                                          batch_size=args.batch_size, precision=args.precision, **setting))
    methods += [BASELINES[name](cache) for name in args.baselines]
    if not methods:
        raise ValueError("nothing to evaluate: give --pipeline and/or --baselines")
    tasks = [Task.parse(t) for t in args.tasks] if args.tasks else None
    evaluate(cache, methods, args.out, protocol=args.protocol, split=args.split, datasets=args.datasets,
             tasks=tasks, slice_stride=args.slice_stride, overwrite=args.overwrite, progress=not args.quiet,
             source_gamma=args.source_gamma)
    print((Path(args.out) / "summary.md").read_text())
    print(f"scores: {Path(args.out) / 'scores.csv'}\nfigures: {Path(args.out) / 'figures'}")
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate_pipeline

    cache = _evaluation_data(args.data)
    _, pipe = _named_pipeline(args.pipeline)
    record = calibrate_pipeline(pipe, cache, Path(args.out), num_samples=args.samples, num_inference_steps=args.steps,
                                uncertainty_window=args.uncertainty_window,
                                coverage=args.coverage, slices_per_case=args.slices_per_case,
                                cases_per_dataset=args.cases_per_dataset, seed=args.seed,
                                fit_weight=not args.keep_weight, overwrite=args.overwrite,
                                conditions=args.conditions, groups=args.groups)
    scale = record["interval_scale"]
    weights = ", ".join(f"{w:.2f} (K={k})" for k, w in record["residual_weight"].items())
    print(f"residual weight {weights}; interval scale (spread pooled over {record['uncertainty_window']} px) "
          f"{'none (one sample)' if scale is None else f'{scale:.3f}'} for {record['coverage']:.0%} coverage, "
          f"fitted on {record['voxels']} brain voxels of {record['slices']} validation slices "
          f"({', '.join(record['datasets'])}); mean squared error there: predictor {record['predictor_mse']:.5f}, "
          f"point estimate {record['point_mse']:.5f}")
    if record.get("interval_scales"):
        targets = {m: v for m, v in record["interval_scales"].items() if m in record["target_voxels"]}
        groups = {m: v for m, v in record["interval_scales"].items() if m not in targets}
        print("per target sequence: " + ", ".join(f"{m} {v:.3f}" for m, v in targets.items())
              + " (a target with fewer calibration voxels uses the pooled scale; voxels per target: "
              + ", ".join(f"{m} {n}" for m, n in record["target_voxels"].items()) + ")")
        if groups:
            print("per finer group (a call uses its most specific one): "
                  + ", ".join(f"{m} {v:.3f}" for m, v in groups.items()))
    print(f"wrote {args.out} (calibration.json says what was fitted)")
    return 0


def cmd_downstream(args) -> int:
    from .evaluation.downstream import downstream_dice
    from .evaluation.protocol import PipelineMethod, Task

    cache = _evaluation_data(args.data)
    path, pipe = _named_pipeline(args.pipeline)
    method = PipelineMethod(pipe, name=path.name, steps=args.diffusion_steps, seed=args.seed)
    downstream_dice(cache, lambda case, sources, target: method(case, Task(tuple(sources), target))[0], args.out,
                    replace=args.replace, dataset=args.dataset, method=path.name, steps=args.steps, seed=args.seed,
                    progress=not args.quiet, overwrite=args.overwrite)
    print((Path(args.out) / "dice.md").read_text())
    return 0


def cmd_export(args) -> int:
    from .export import export

    out = export(args.run_dir, args.out, evaluation=args.evaluation, method=args.method, dtype=args.dtype,
                 repo_id=args.repo_id, training_note=args.training_note, downstream=args.downstream,
                 overwrite=args.overwrite)
    print(f"pipeline: {out}\nmodel card: {out / 'README.md'}")
    return 0


def cmd_push(args) -> int:
    from .export import format_publish_list, publish_list, push

    files, left_out = publish_list(args.folder)
    print(f"{'would upload' if args.dry_run else 'uploading'} to {args.repo_id}: "
          + format_publish_list(args.folder, files, left_out), flush=True)
    if args.dry_run:
        print("dry run: nothing uploaded")
        return 0
    url = push(args.folder, args.repo_id, private=args.private, commit_message=args.message, revision=args.revision,
               files=files)
    print(f"pushed {args.folder} to {args.repo_id}: {url}")
    return 0


def cmd_demo(args) -> int:
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise SystemExit('mmdiff demo needs gradio: pip install "mmdiff[demo]"') from None
    from .demo import build_demo, launch, load_engines

    engines = load_engines({"gan": args.gan, "ldm": args.ldm}, engines=args.engines)
    limits = {"max_mb": args.max_upload_mb} if args.max_upload_mb else {}
    demo = build_demo(engines, example_cohorts=args.examples, default_engine=args.engines[0], **limits)
    launch(demo, server_name=args.host, server_port=args.port, share=args.share, **limits)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmdiff", description="Fill in missing MRI sequences.")
    parser.add_argument("--version", action="version", version=f"mmdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("quickstart", help="hide sequences of a phantom exam and synthesize them with both engines")
    p.add_argument("--out", default="mmdiff-quickstart", help="output folder (default: %(default)s)")
    p.add_argument("--hide", nargs="+", default=["t1c", "flair"], help="sequences to hide (default: %(default)s)")
    p.add_argument("--engines", nargs="+", choices=["gan", "ldm"], default=["gan", "ldm"])
    p.add_argument("--steps", type=int, help="diffusion steps (default: the pipeline's)")
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
    p.add_argument("--normalisation", choices=["median", "percentile"], default="median",
                   help="intensity rule: divide by --median-scale x the brain median, or clip at "
                        "--clip-percentile inside the brain (default: %(default)s)")
    p.add_argument("--median-scale", type=float, default=3.0, help="the brain median maps to 1/this (default: 3)")
    p.add_argument("--clip-percentile", type=float, default=99.5, help="for --normalisation percentile")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="split seed")
    p.add_argument("--mask-labels", action="append", default=[], metavar="NAME=CONVENTION",
                   help="how a dataset's lesion masks are numbered: brats (default: 1 core or lesion, 2 oedema, "
                        "3 or 4 enhancing; a mask stored as 255 is binary) or binary (every non-zero voxel is "
                        "lesion: masks that number each lesion 1, 2, 3...); repeatable")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)
    p = sub.add_parser("synthesize", help="synthesize the missing sequences of one exam, or of every case of a cohort (NIfTI in, NIfTI out)")
    for m in KNOWN_MODALITIES:
        p.add_argument(f"--{m}", metavar="NIFTI", help=f"the {m.upper()} volume, if the exam has one")
    p.add_argument("--cases", metavar="FOLDER|CSV",
                   help="a cohort instead of one exam: a dataset folder (BraTS, BIDS) or a manifest, read as "
                        "`mmdiff scan` reads it; the model loads once and each case goes to OUT/<case_id>/ "
                        "(cases whose outputs exist are skipped; OUT/cases.json records each case)")
    p.add_argument("--dataset", help="the site's dataset name (unknown or none: the null dataset, for unseen sites; "
                                     "with --cases, default: each case's dataset)")
    p.add_argument("--out", required=True, help="output folder: <target>_synthetic.nii.gz and JSON sidecars")
    p.add_argument("--engine", choices=["ldm", "gan"],
                   help="the published pipeline to use: latent diffusion (default) or the one-step GAN; with "
                        "--pipeline, a check that it is of that engine")
    p.add_argument("--pipeline", help="pipeline folder or Hub repo id (default: the published one of --engine)")
    p.add_argument("--targets", nargs="+", help="sequences to make (default: every one not given; with --cases, a "
                                                "case's own file of a target is not used as an input)")
    p.add_argument("--steps", type=int, help="diffusion steps (ldm; default: the pipeline's)")
    p.add_argument("--scheduler", choices=list(SCHEDULER_NAMES), help="diffusion scheduler (ldm; default: the pipeline's)")
    p.add_argument("--samples", type=int, help="samples per slice; >1 also writes uncertainty maps (ldm; default: "
                                               "the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--brain-mask", metavar="NIFTI", help="brain mask on the inputs' grid (default: derived; "
                                                         "needed for heads that are not skull-stripped)")
    p.add_argument("--batch-size", type=int, default=8, help="axial slices per forward pass")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="auto",
                   help="the networks' precision: auto (bfloat16 autocast on a CPU with native bf16, else "
                        "float32; default), float32 or bfloat16")
    p.add_argument("--flip-average", action="store_true",
                   help="GAN engine: also run each slice mirrored left-right and average the two images (a better "
                        "image, about +0.1-0.2 dB PSNR, for twice the network time)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs")
    p.set_defaults(func=cmd_synthesize)

    p = sub.add_parser("evaluate", help="score pipelines and baselines on held-out cases of a prepared cache")
    p.add_argument("--pipeline", nargs="+", metavar="PATH|ldm|gan",
                   help="pipeline folders (ldm / gan: the published ones); each is scored")
    p.add_argument("--data", required=True, help="prepared cache folder, or a data config name (tiny, cpu, paper)")
    p.add_argument("--protocol", choices=["paper", "all-subsets"], default="paper",
                   help="the paper's tasks, or every subset of the available inputs (default: %(default)s)")
    p.add_argument("--tasks", nargs="+", metavar="SOURCES->TARGET", help="only these tasks, e.g. t1+t2+flair->t1c")
    p.add_argument("--split", nargs="+", default=["test"], help="cache split(s) to score (default: test)")
    p.add_argument("--datasets", nargs="+", help="only these datasets of the cache")
    p.add_argument("--baselines", nargs="*", default=["copy-nearest", "voxel-regression"],
                   help="baselines scored alongside (default: %(default)s; none: --baselines)")
    p.add_argument("--steps", type=int, nargs="+",
                   help="diffusion steps (ldm; several: one method per count; default: the pipeline's)")
    p.add_argument("--scheduler", nargs="+", choices=list(SCHEDULER_NAMES),
                   help="diffusion scheduler(s) (ldm; several: one method each; default: the pipeline's)")
    p.add_argument("--samples", type=int, help="samples per slice (ldm; >1 adds uncertainty maps; default: the "
                                               "pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--flip-average", action="store_true",
                   help="GAN pipelines: also score each with --flip-average (a second method, '... (flip-averaged)')")
    p.add_argument("--unseen-site", action="store_true",
                   help="also score each pipeline with no dataset (the null embedding: what a scan from a site the "
                        "model was not trained on gets; a second method, '... (unseen site)')")
    p.add_argument("--source-gamma", type=float, default=1.0, metavar="GAMMA",
                   help="give every method the sources raised to this power on the [0, 1] scale (tissue contrasts "
                        "as another protocol might give them), scored against the real target (default: 1, as is)")
    p.add_argument("--slice-stride", type=int, default=1, help="score every k-th axial slice (default: all)")
    p.add_argument("--batch-size", type=int, default=16, help="slices per forward pass")
    p.add_argument("--precision", choices=PRECISION_NAMES, default="auto",
                   help="the pipelines' network precision (auto: bfloat16 autocast on a CPU with native bf16)")
    p.add_argument("--out", required=True, help="output folder: scores.csv, summary.md, figures/")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("calibrate", help="refit a diffusion pipeline's point-estimate weight and uncertainty "
                                         "scale on a cache's validation cases; writes a new pipeline folder")
    p.add_argument("pipeline", metavar="PATH|ldm", help="the diffusion pipeline (ldm: the published one)")
    p.add_argument("--data", required=True, help="prepared cache folder, or a data config (tiny, cpu, paper)")
    p.add_argument("--out", required=True, help="the calibrated pipeline folder (never the input folder)")
    p.add_argument("--samples", type=int, help="samples per slice (>= 2, or any with an error model, fits the "
                                               "uncertainty scale; default: the pipeline's, the count the scale "
                                               "then holds for)")
    p.add_argument("--steps", type=int, help="diffusion steps (default: the pipeline's)")
    p.add_argument("--uncertainty-window", type=int, metavar="PIXELS",
                   help="pool the samples' variance over this many pixels square before the scale is fitted "
                        "(1: per voxel; default: 5, see mmdiff.pipelines.ldm.sample_spread)")
    p.add_argument("--coverage", type=float, help="fraction of brain voxels image +- uncertainty should cover "
                                                  "(default: the pipeline's)")
    p.add_argument("--slices-per-case", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--cases-per-dataset", type=int, default=4, help="(default: %(default)s)")
    p.add_argument("--groups", action="store_true",
                   help="also fit a scale per target on each dataset and per number of sources, where the "
                        "validation slices have the voxels (worth it with many validation cases per site; "
                        "with two it made held-out coverage worse, BENCHMARKS.md session 13)")
    p.add_argument("--conditions", choices=["random", "all-but-one", "one-to-one", "many-to-one"],
                   help="the sources and targets each validation slice gets (default: random, any non-empty "
                        "proper subset of its sequences as sources and the rest as targets)")
    p.add_argument("--keep-weight", action="store_true", help="fit only the scale; the residual weight stays 1")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier OUT folder")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("downstream", help="segmentation Dice with a synthetic sequence vs a network lacking it")
    p.add_argument("--pipeline", default="gan", metavar="PATH|ldm|gan", help="the synthesising pipeline (default: gan)")
    p.add_argument("--data", required=True, help="prepared cache folder with labelled BraTS cases, or a data config")
    p.add_argument("--replace", default="t1c", help="the sequence replaced by its synthesis (default: %(default)s)")
    p.add_argument("--dataset", default="brats", help="the labelled dataset of the cache (default: %(default)s)")
    p.add_argument("--steps", type=int, default=1500, help="segmentation training steps (default: %(default)s)")
    p.add_argument("--diffusion-steps", type=int, help="ldm sampling steps (default: the pipeline's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder: dice.csv, dice.md, dice.json")
    p.add_argument("--overwrite", action="store_true", help="replace earlier results")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_downstream)

    p = sub.add_parser("export", help="a training run -> pipeline folder (HF layout) with a model card")
    p.add_argument("run_dir", help="training output folder (holds final/)")
    p.add_argument("out", help="pipeline folder to write, e.g. pipelines/mmdiff-gan")
    p.add_argument("--evaluation", help="an `mmdiff evaluate` output folder: its scores fill the card's results")
    p.add_argument("--method", help="the method name in the evaluation (default: the OUT folder's name)")
    p.add_argument("--downstream", help="an `mmdiff downstream` output folder: its Dice table goes into the card")
    p.add_argument("--dtype", choices=["float16", "float32"], default="float16", help="weights (default: %(default)s)")
    p.add_argument("--repo-id", help="the Hub repo id the card's usage examples name")
    p.add_argument("--training-note", help="a sentence for the card's training row (what the run record lacks)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("push", help="upload a pipeline (components, model_index.json, card, training_info) to the Hub")
    p.add_argument("folder", help="pipeline folder written by `mmdiff export`")
    p.add_argument("--repo-id", required=True, help="ORG/NAME on the Hub (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", help="branch to commit to (default: main)")
    p.add_argument("--message", help="commit message")
    p.add_argument("--dry-run", action="store_true", help="list what would be uploaded, upload nothing")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("demo", help="serve the browser demo (gradio; pip install \"mmdiff[demo]\")")
    p.add_argument("--host", default=None, help="address to bind (default: 127.0.0.1, or $GRADIO_SERVER_NAME)")
    p.add_argument("--port", type=int, default=None, help="port (default: 7860, or $GRADIO_SERVER_PORT)")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--engines", nargs="+", choices=["gan", "ldm"], default=["gan", "ldm"],
                   help="engines offered; the first is the default (default: %(default)s)")
    p.add_argument("--gan", metavar="PATH_OR_REPO", help="GAN pipeline (default: $MMDIFF_GAN_PIPELINE or the published one)")
    p.add_argument("--ldm", metavar="PATH_OR_REPO", help="diffusion pipeline (default: $MMDIFF_LDM_PIPELINE or the published one)")
    p.add_argument("--examples", nargs="*", metavar="COHORT",
                   help="phantom cohorts bundled as examples (default: all four; none: --examples)")
    p.add_argument("--max-upload-mb", type=float, help="largest upload accepted (default: 200, or $MMDIFF_DEMO_MAX_UPLOAD_MB)")
    p.set_defaults(func=cmd_demo)

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
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line per warning, no source line
        try:
            return args.func(args)
        except (ValueError, FileExistsError, FileNotFoundError) as exc:
            # the error types mmdiff raises for bad input: say what is wrong, no traceback
            return _error(args.command, exc, 2)
        except KeyboardInterrupt:
            return _error(args.command, "interrupted (nothing half-written is left behind)", 130)
        except OSError as exc:  # the disk or the system said no
            return _error(args.command, _os_error(exc), 1)
        except Exception as exc:  # a bug: still one line, the traceback on request
            if os.environ.get("MMDIFF_DEBUG"):
                raise
            return _error(args.command, f"unexpected {type(exc).__name__}: {exc} (this is a bug in mmdiff: "
                          "please report it; MMDIFF_DEBUG=1 shows the traceback)", 1)


def _one_line(text) -> str:
    return " ".join(str(text).split())


def _error(command: str, message, code: int) -> int:
    print(f"mmdiff {command}: error: {_one_line(message)}", file=sys.stderr)
    return code


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"mmdiff: warning: {_one_line(message)}", file=sys.stderr)


def _os_error(exc: OSError) -> str:
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return (f"no space left on the device{where}: free some space or choose another folder; "
                "nothing was left half-written")
    if exc.errno == errno.EROFS:
        return f"read-only file system{where}: choose a folder you can write to"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"permission denied{where}: check its permissions, or choose a folder you can write to"
    return f"{exc.strerror or exc}{where}"


if __name__ == "__main__":
    sys.exit(main())
