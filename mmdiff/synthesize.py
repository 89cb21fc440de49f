"""Files in, files out: synthesize the missing sequences of one exam, or of every case of a cohort
(``mmdiff synthesize``; ``--cases`` for a cohort).

Each target becomes ``OUT/<target>_synthetic.nii.gz`` on the inputs' own grid and affine, marked
synthetic in its NIfTI header, with a JSON sidecar recording the model, its revision, the inputs,
the seed and the steps; with several samples (or a diffusion pipeline with an error model),
``OUT/<target>_uncertainty.nii.gz`` holds the calibrated per-voxel uncertainty. Nothing is written
over an input, and nothing over an existing file unless ``overwrite``. Files, options and the output
folder are checked (:mod:`mmdiff.validation`) before the model loads; the outputs are written to a
hidden staging folder inside the output folder and moved into place together, so a failed run leaves
no new file and no partial output set.

A cohort (:func:`synthesize_cases`: a dataset folder or manifest, read as ``mmdiff scan`` reads it)
loads the model once and writes each case to ``OUT/<case_id>/``, so a case costs its own work and not
the process start and the model load (most of a fresh ``mmdiff synthesize``'s time on a CPU). A case
that fails is recorded and the others go on; a case whose outputs exist is skipped (unless
``overwrite``), so a run that was stopped continues where it stopped. ``OUT/cases.json`` records each
case's outcome.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .io import (OverwriteError, SYNTHETIC_DESCRIP, check_not_input, provenance_record, save_nifti, sidecar_path,
                 write_json)
from .modalities import canonical
from .validation import (check_flip_average, check_input_files, check_output_folder, check_pipeline_source,
                         check_synthesize_options)

#: the hidden folder inside ``--out`` that a run's outputs are written to before they move into place
STAGING_PREFIX = ".mmdiff-synthesize-"

def revision(source: str | os.PathLike) -> str:
    """A short content hash of a local pipeline folder's index and weights (or the repo id itself).

    Hashed once per folder state (path, sizes and modification times of its files): a cohort run asks
    for every case, and rereading the weights for each would cost a read of the whole model a case."""
    path = Path(source)
    if not path.is_dir():
        return str(source)
    files = sorted(f for f in path.rglob("*") if f.suffix in (".json", ".safetensors") and f.is_file())
    stamp = tuple((str(f.relative_to(path)), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    return _content_hash(str(path.resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _content_hash(folder: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        digest.update(name.encode())
        digest.update((Path(folder) / name).read_bytes())
    return digest.hexdigest()[:16]


def output_paths(out: Path, targets: list[str], uncertainty: bool) -> dict[str, Path]:
    paths = {t: out / f"{t}_synthetic.nii.gz" for t in targets}
    if uncertainty:
        paths |= {f"{t}_uncertainty": out / f"{t}_uncertainty.nii.gz" for t in targets}
    return paths


def synthesize(
    inputs: dict[str, str | os.PathLike],
    out: str | os.PathLike,
    pipeline=None,
    pipeline_source: str | os.PathLike | None = None,
    engine: str | None = None,
    dataset: str | None = None,
    targets: list[str] | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    brain_mask: str | os.PathLike | None = None,
    batch_size: int = 8,
    precision: str = "auto",
    flip_average: bool = False,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Synthesize the missing sequences of one exam from NIfTI files; returns the written paths.

    ``pipeline_source`` (a folder or Hub repo id; default: the published pipeline of ``engine``,
    else the LDM) is loaded unless ``pipeline`` is given; the provenance records the engine that ran.
    ``steps`` and ``samples`` left unset take the diffusion pipeline's own defaults; ``precision`` is
    the networks' (:mod:`mmdiff.pipelines.precision`), and the record says which one ran.
    ``flip_average`` (GAN engine): also run the generator on the mirrored slices and average
    (:func:`mmdiff.pipelines.gan.mirrored`; twice the network time), recorded too.
    Every file and option is checked before the model loads; the outputs are written to a hidden
    folder inside ``out`` and moved into place together, so a failure leaves no new file behind.
    """
    check_synthesize_options(engine, steps, samples, batch_size, seed, scheduler, targets, inputs or {}, flip_average)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # read once, here (the pipeline takes the volumes as they are), while torch and diffusers import:
        # a fresh process spends seconds importing them on one core, and gzip inflation needs no GIL
        reading = pool.submit(check_input_files, inputs, brain_mask)
        import torch

        from .data.preprocessing import MRIPreprocessor
        from .pipelines import load_pipeline, resolve_precision, resolve_source
        from .pipelines.common import diffusion_settings

        resolve_precision(precision, "cpu")  # a bad value: before the model loads
        volumes = reading.result()
    inputs = {m: volume.path for m, volume in volumes.items()}
    input_files = list(inputs.values()) + ([Path(brain_mask)] if brain_mask else [])
    out = check_output_folder(out, input_files)
    if pipeline is None:
        source = resolve_source(pipeline_source, engine)
        index = check_pipeline_source(source)  # a broken or foreign folder: one line before anything loads
        if index is not None:  # a pipeline folder says which engine it is
            found = "gan" if index["_class_name"] == "MMGANPipeline" else "ldm"
            check_synthesize_options(found, steps, samples, batch_size, seed, scheduler, targets, inputs, flip_average)
        pipe = load_pipeline(source, engine)  # checks that it is of `engine`, when given
    else:
        source = resolve_source(pipeline_source) if pipeline_source is not None else None
        pipe = pipeline
        if engine is not None and pipe.engine != engine:
            raise ValueError(f"the pipeline is {type(pipe).__name__} (engine {pipe.engine}), not the {engine} engine")
    diffusion = pipe.engine == "ldm"
    check_flip_average(pipe.engine, flip_average)  # a pipeline given as an object
    steps, samples = diffusion_settings(pipe, steps, samples) if diffusion else (steps, 1)
    if scheduler is not None:
        if not diffusion:
            raise ValueError(f"--scheduler is for the diffusion engine; the {pipe.engine} pipeline has no scheduler")
        from .pipelines import use_scheduler

        use_scheduler(pipe, scheduler)
    modalities = pipe.modalities
    targets = [canonical(t, modalities) for t in targets] if targets else [m for m in modalities if m not in inputs]
    error_model = getattr(pipe, "error_model", None) is not None
    paths = output_paths(out, targets, uncertainty=diffusion and (samples > 1 or error_model))
    for path in paths.values():
        check_not_input(path, input_files)
        for file in (path, sidecar_path(path)):
            if file.exists() and not overwrite:
                raise OverwriteError(f"{file} exists (pass --overwrite to replace it)")
    generator = torch.Generator().manual_seed(seed)
    kwargs = ({"num_inference_steps": steps, "num_samples": samples, "generator": generator} if diffusion
              else {"flip_average": flip_average})
    precision = resolve_precision(precision, pipe._execution_device)
    result = pipe(volumes, dataset=dataset, targets=targets, output_type="nifti",
                  brain_mask=str(brain_mask) if brain_mask else None, batch_size=batch_size, precision=precision,
                  **kwargs)
    provenance = {
        "model": str(source if source is not None else getattr(pipe, "name_or_path", None) or type(pipe).__name__),
        "model_revision": revision(source) if source is not None else None, "engine": pipe.engine,
        "pipeline": type(pipe).__name__,
        "dataset": dataset, "inputs": {m: str(p.resolve()) for m, p in inputs.items()},
        "brain_mask": str(Path(brain_mask).resolve()) if brain_mask else "derived from the inputs",
        "targets": targets, "seed": seed, "precision": precision,
        **({} if diffusion else {"flip_average": flip_average}),
        **({"steps": steps, "samples": samples, "scheduler": type(pipe.scheduler).__name__} if diffusion else {}),
        "intensity_units": "mmdiff normalised [0, 1]: " + (getattr(pipe, "preprocessor", None)
                                                            or MRIPreprocessor.legacy()).describe(),
    }
    created = [folder for folder in (out, *out.parents) if not folder.exists()]  # innermost first
    out.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(out)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=out))
    def stage(item):
        name, path = item
        target, _, kind = name.partition("_")
        image = (result.uncertainty if kind else result.images)[target]
        save_nifti(np.asarray(image.dataobj, dtype=np.float32), image.affine, staging / path.name,
                   header=image.header, descrip=SYNTHETIC_DESCRIP, inputs=input_files)
        write_json(staging / sidecar_path(path).name,
                   provenance_record({**provenance, "target": target,
                                      "map": (f"uncertainty: image +- it covers {pipe.config.coverage:.0%} of brain voxels "
                                              "(calibrated; " + ("the error model's scale and " if error_model else "")
                                              + "the samples' std)") if kind else "synthetic image"}),
                   inputs=input_files)
        return {staging / path.name: path, staging / sidecar_path(path).name: sidecar_path(path)}

    try:
        staged = {}
        with ThreadPoolExecutor(max_workers=min(4, len(paths))) as pool:  # gzip releases the GIL
            for files in pool.map(stage, paths.items()):
                staged |= files
        move_into_place(staged, staging / "replaced")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:  # folders made for a run that wrote nothing
            if not any(folder.iterdir()):
                folder.rmdir()
    return dict(paths)


def remove_dead_staging(out: Path) -> None:
    """Remove the staging folders that runs killed before their outputs were moved into place left
    in ``out`` (their process is gone; a live run's folder is left alone)."""
    for folder in out.glob(f"{STAGING_PREFIX}*"):
        pid = folder.name[len(STAGING_PREFIX):].split("-")[0]
        if pid.isdigit() and folder.is_dir() and not folder.is_symlink() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def move_into_place(staged: dict[Path, Path], backup: Path) -> None:
    """Rename every staged file onto its final path (same folder, so each rename is atomic); files
    replaced on the way are kept in ``backup`` until all are in place, and put back if one fails."""
    moved, replaced = [], []
    try:
        for source, final in staged.items():
            if final.exists():
                backup.mkdir(exist_ok=True)
                os.replace(final, backup / final.name)
                replaced.append(final)
            os.replace(source, final)
            moved.append(final)
    except BaseException:
        for final in moved:
            final.unlink(missing_ok=True)
        for final in replaced:
            os.replace(backup / final.name, final)
        raise


#: the record of a cohort run, in its output folder
CASES_RECORD = "cases.json"
_SAFE_CASE = re.compile(r"[^A-Za-z0-9._-]+")


def case_folder_names(cases) -> dict[tuple[str, str], str]:
    """(dataset, case_id) -> the case's output folder name: its case id with anything but letters,
    digits, ``.``, ``_`` and ``-`` replaced by ``_``; a name two cases would share is an error."""
    names, seen = {}, {}
    for case in cases:
        name = _SAFE_CASE.sub("_", case.case_id).strip("._") or "case"
        key = (case.dataset, case.case_id)
        if name in seen and seen[name] != key:
            raise ValueError(f"cases {seen[name][1]!r} ({seen[name][0]}) and {case.case_id!r} ({case.dataset}) "
                             f"would share the output folder {name!r}: give them distinct case ids")
        seen[name] = key
        names[key] = name
    return names


def synthesize_cases(
    cases: str | os.PathLike | list,
    out: str | os.PathLike,
    pipeline=None,
    pipeline_source: str | os.PathLike | None = None,
    engine: str | None = None,
    dataset: str | None = None,
    targets: list[str] | None = None,
    steps: int | None = None,
    scheduler: str | None = None,
    samples: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    precision: str = "auto",
    flip_average: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Synthesize every case of a cohort with one model load; returns the run's record.

    ``cases``: a dataset folder or manifest (read by :func:`mmdiff.data.layouts.scan`), or a list of
    :class:`~mmdiff.data.manifest.Case`. Each case's sequences are its inputs and its ``brainmask``
    file, if any, its brain mask; lesion masks are not read. ``targets`` (default: each case's missing
    sequences) are made for every case, and a case's own file of a target is left out of its inputs,
    so a synthetic sequence can be set beside the real one. ``dataset`` names the site for every case
    (default: each case's own dataset name; a name the model does not know is the null dataset).
    The record (``OUT/cases.json``) has, per case, ``status`` (``done``, ``skipped``: its outputs
    exist, ``failed``: with the error), its folder, outputs and seconds.
    """
    from tqdm.auto import tqdm

    from .data.layouts import scan
    from .modalities import KNOWN_MODALITIES
    from .pipelines import load_pipeline, resolve_precision, resolve_source

    resolve_precision(precision, "cpu")  # a bad value: before anything is read
    check_synthesize_options(engine, steps, samples, batch_size, seed, scheduler, None, (), flip_average)
    if not isinstance(cases, list):
        cases = scan(cases)
    if not cases:
        raise ValueError("no cases found: pass a dataset folder (BraTS, BIDS) or a manifest with at least one case")
    hidden = {canonical(t, KNOWN_MODALITIES) for t in targets or ()}
    folders = case_folder_names(cases)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: pass a folder")
    source = None
    if pipeline is None:
        source = resolve_source(pipeline_source, engine)
        check_pipeline_source(source)
        pipeline = load_pipeline(source, engine)
    elif pipeline_source is not None:
        source = resolve_source(pipeline_source)
    pipeline.set_progress_bar_config(disable=True)  # one bar, over the cases
    check_flip_average(pipeline.engine, flip_average)
    record = {"model": str(source) if source is not None else type(pipeline).__name__, "engine": pipeline.engine,
              "precision": resolve_precision(precision, pipeline._execution_device),
              **({"flip_average": flip_average} if pipeline.engine == "gan" else {}),
              "targets": sorted(hidden) if targets else "each case's missing sequences", "seed": seed, "cases": []}
    known = list(pipeline.modalities)
    for target in targets or ():  # a target the model cannot make fails every case: say so once, here
        canonical(target, known)
    bar = tqdm(cases, desc="synthesize", unit="case", disable=not progress)
    try:
        for case in bar:
            folder = out / folders[(case.dataset, case.case_id)]
            entry = {"case_id": case.case_id, "dataset": case.dataset, "folder": str(folder)}
            inputs = {m: path for m, path in case.files.items() if m in known and m not in hidden}
            unknown = [m for m in case.modalities if m not in known]
            if unknown:  # a sequence the model was not trained on cannot be an input; the rest can
                entry["not_used"] = f"{', '.join(unknown)}: the model does not know it (it knows {', '.join(known)})"
            wanted = targets or [m for m in known if m not in inputs]
            start = time.perf_counter()
            if not wanted:
                entry |= {"status": "skipped", "reason": "the case has every sequence the model makes", "seconds": 0.0}
                record["cases"].append(entry)
                continue
            try:
                written = synthesize(inputs, folder, pipeline=pipeline, pipeline_source=source, engine=engine,
                                     dataset=dataset or case.dataset, targets=wanted, steps=steps,
                                     scheduler=scheduler, samples=samples, seed=seed,
                                     brain_mask=case.files.get("brainmask"), batch_size=batch_size,
                                     precision=precision, flip_average=flip_average, overwrite=overwrite)
                entry |= {"status": "done", "outputs": {k: str(v) for k, v in written.items()}}
            except OverwriteError as exc:
                entry |= {"status": "skipped", "reason": str(exc)}
            except Exception as exc:  # noqa: BLE001  one case's bad file must not lose the others
                entry |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                bar.write(f"{case.case_id}: failed: {type(exc).__name__}: {exc}")
            entry["seconds"] = round(time.perf_counter() - start, 2)
            record["cases"].append(entry)
    finally:  # also when stopped: the cases done so far are in place, and the record says which
        record["summary"] = {s: sum(e["status"] == s for e in record["cases"]) for s in ("done", "skipped", "failed")}
        if len(record["cases"]) < len(cases):
            record["summary"]["not_reached"] = len(cases) - len(record["cases"])
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / CASES_RECORD, record)
    return record
