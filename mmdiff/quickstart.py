"""``mmdiff quickstart``: a phantom exam with some sequences hidden, filled in by both engines.

Writes the phantom case (its real files), ``<engine>/<target>_synthetic.nii.gz`` for each engine, a
montage PNG (real, synthetic, error per hidden sequence, and the diffusion engine's uncertainty beside
its error) and ``metrics.md`` with PSNR/SSIM/MAE inside
the brain, the lesion and the whole image. The case is a glioma phantom the models held out of
training: the first test case their ``training_info.json`` names (for the published pipelines,
PhantomGLI-00005-000); with pipelines that name none, the cohort's first case, and ``metrics.md``
says that it may have been seen in training.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .data.phantom import case_id, simulate_case, write_case
from .evaluation.protocol import NORMALISATION, robust_normalise, score
from .io import load_volume, write_text
from .modalities import MODALITIES, canonical
from .resources import ENGINES, published_pipeline
from .synthesize import synthesize
from .viz import display, lesion_centre, montage

DEFAULT_HIDDEN = ("t1c", "flair")
COHORT = "glioma"


def held_out_case(folders, cohort: str = COHORT, search: int = 100) -> int | None:
    """The index of the first ``cohort`` phantom case that every pipeline folder's training record
    names as held out (test split first, then validation); None when a record does not say."""
    from .export import training_data

    common = None
    for folder in folders:
        path = Path(folder) / "training_info.json" if folder else None  # a model built in memory: no record
        data = training_data(json.loads(path.read_text())) if path is not None and path.is_file() else None
        held = (data or {}).get("datasets", {}).get(cohort, {}).get("held_out")
        if not held:
            return None
        ids = list(held.get("test", [])) + list(held.get("val", []))
        common = ids if common is None else [i for i in common if i in ids]
    for wanted in common or []:
        for index in range(search):
            if case_id(cohort, index) == wanted:
                return index
    return None


def quickstart(out: str | os.PathLike, hide=DEFAULT_HIDDEN, engines=ENGINES, pipelines: dict | None = None,
               steps: int | None = None, seed: int = 0, spacing: float = 1.0, overwrite: bool = False,
               progress: bool = True) -> dict:
    """Run the quickstart; ``pipelines`` maps engine -> a loaded pipeline (default: the published ones);
    ``spacing`` scales the phantom's voxel size (the models were trained at 1 mm).
    Returns ``{"case", "files", "montage", "metrics", "scores"}``."""
    out = Path(out)
    hidden = [canonical(m) for m in hide]  # the glioma phantom has all six sequences
    if set(hidden) >= set(MODALITIES):
        raise ValueError("hide at least one sequence fewer than the case has: something must stay as input")
    given = pipelines or {}
    # the folder each engine's model came from (diffusers records it), whose training record names its held-out cases
    folders = [given[e].config.get("_name_or_path") if given.get(e) is not None else published_pipeline(e)
               for e in engines]
    index = held_out_case(folders)
    case = simulate_case(COHORT, 0 if index is None else index, seed=seed, spacing=spacing)
    written = write_case(case, out / "phantom", overwrite=overwrite)
    inputs = {m: p for m, p in written.files.items() if m in case.images and m not in hidden}
    results, files = {}, {}
    for engine in engines:
        pipe = (pipelines or {}).get(engine)
        if pipe is not None:
            pipe.set_progress_bar_config(disable=not progress)
        files[engine] = synthesize(inputs, out / engine, pipeline=pipe, engine=engine, dataset=case.dataset,
                                   targets=hidden, steps=steps, seed=seed, overwrite=overwrite)
        results[engine] = {t: load_volume(files[engine][t]).data for t in hidden}

    brain = case.brain_mask > 0 if case.brain_mask is not None else case.images[hidden[0]] > 0
    lesion = case.seg > 0 if case.seg is not None else None
    scores = {(engine, t): score(results[engine][t], case.images[t], brain, lesion)
              for engine in engines for t in hidden}
    seen = ("held out of the models' training (their training_info.json)" if index is not None else
            "not named as held out by the models' training records: they may have trained on it")
    lines = [f"Phantom case {case.case_id} ({case.dataset}, {seen}); inputs {', '.join(inputs)}; "
             f"hidden {', '.join(hidden)}.",
             f"Normalisation: {NORMALISATION}.", "",
             "| engine | target | PSNR brain (dB) | SSIM brain | MAE brain | PSNR lesion | SSIM lesion | PSNR whole "
             "| SSIM whole |", "|---|---|---|---|---|---|---|---|---|"]
    for (engine, target), s in scores.items():
        lines.append(f"| {engine} | {target} | {s['psnr_brain']:.2f} | {s['ssim_brain']:.3f} | {s['mae_brain']:.3f} "
                     f"| {s['psnr_lesion']:.2f} | {s['ssim_lesion']:.3f} | {s['psnr_whole']:.2f} | {s['ssim_whole']:.3f} |")
    metrics = write_text(out / "metrics.md", "\n".join(lines) + "\n", overwrite=overwrite)

    k = lesion_centre(case.seg)[2] if case.seg is not None else None
    rows = [("inputs", [(m, display(case.images[m], 2, k)) for m in inputs])]
    for t in hidden:
        real = robust_normalise(case.images[t], brain, lesion)
        panels = [(f"real {t}", display(real, 2, k))]
        for engine in engines:
            synthetic = robust_normalise(results[engine][t], brain, lesion)
            panels += [(f"{engine} {t}", display(synthetic, 2, k)),
                       (f"{engine} |error|", display(np.abs(synthetic - real), 2, k))]
            uncertainty = files[engine].get(f"{t}_uncertainty")  # a diffusion engine with K > 1
            if uncertainty is not None:  # where it says it may be wrong, beside where it is
                panels.append((f"{engine} uncertainty", display(load_volume(uncertainty).data, 2, k)))
        rows.append((t, panels))
    picture = montage(rows, out / "montage.png", title=f"{case.case_id}: hidden {', '.join(hidden)}, "
                      "synthesised (marked synthetic in every file)", overwrite=overwrite)
    return {"case": case.case_id, "files": files, "montage": picture, "metrics": metrics, "scores": scores}
