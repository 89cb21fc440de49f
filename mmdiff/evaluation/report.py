"""Run the protocol over held-out cases and write what a reader needs: a CSV with one row per case,
task, method and the three regions; a markdown summary (mean +- std over cases, brain-masked first);
one figure grid PNG per task (inputs, real, each method's synthetic, its error, the uncertainty)."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from ..io import atomic_path, write_text
from ..viz import display, montage, outlined
from .protocol import (NORMALISATION, EvalCase, Task, load_cases, robust_normalise, score, tasks_for,
                       uncertainty_scores, with_source_gamma)

Method = Callable[[EvalCase, Task], tuple[np.ndarray, np.ndarray | None]]
SUMMARY_COLUMNS = ("psnr_brain", "ssim_brain", "mae_brain", "psnr_lesion", "ssim_lesion", "psnr_whole", "ssim_whole",
                   "contrast_lesion", "contrast_lesion_real")
SPREAD_COLUMNS = ("spread_brain", "corr_brain")
CONTRAST_COLUMNS = tuple(f"contrast_label{k}{suffix}" for k in (1, 2, 3) for suffix in ("", "_real"))
UNCERTAINTY_COLUMNS = ("coverage", "coverage_lesion", "spearman_uncertainty")


def evaluate(cache: str | Path, methods: Sequence[Method], out: str | Path, protocol: str = "paper",
             split: str | Sequence[str] = "test", datasets: Sequence[str] | None = None,
             tasks: Sequence[Task] | None = None, slice_stride: int = 1, figures: bool = True,
             progress: bool = True, overwrite: bool = False, source_gamma: float = 1.0) -> list[dict]:
    """Score every method on every task of every held-out case; write ``scores.csv``, ``summary.md``
    and ``figures/<task>.png`` under ``out``; return the score rows. ``source_gamma``: every method gets
    the sources with their contrast changed (:func:`~mmdiff.evaluation.protocol.with_source_gamma`) and
    is scored against the real target. Two methods of one name are refused: their rows would merge."""
    names = [method.name for method in methods]
    if len(set(names)) < len(names):
        raise ValueError(f"two methods are named {sorted({n for n in names if names.count(n) > 1})}: each "
                         "method's rows are told apart by its name, so give each its own")
    out = Path(out)
    cases = list(load_cases(cache, split, datasets, slice_stride))
    if not cases:
        raise ValueError(f"no {split} cases in {cache}" + (f" for datasets {list(datasets)}" if datasets else ""))
    work = [(case, task) for case in cases
            for task in (tasks_for(case.images, protocol) if tasks is None else
                         [t for t in tasks if t.target in case.images and set(t.sources) <= set(case.images)])]
    if not work:
        raise ValueError("no case has the modalities of any requested task")
    rows, shown = [], {}
    for case, task in tqdm(work, desc="evaluate", unit="task", disable=not progress):
        reference = case.images[task.target]
        inputs = with_source_gamma(case, task.sources, source_gamma)
        results = {}
        k = case.scored
        for method in methods:
            if hasattr(method, "supports") and not method.supports(task):
                continue  # a sequence the model does not know: no row, not a zero
            prediction, uncertainty = method(inputs, task)
            results[method.name] = (prediction, uncertainty)
            rows.append({"dataset": case.dataset, "case": case.case_id, "split": case.split, "task": task.name, "method": method.name,
                         **score(prediction[..., k], reference[..., k], case.brain[..., k],
                                 None if case.lesion is None else case.lesion[..., k],
                                 None if case.labels is None else case.labels[..., k]),
                         **uncertainty_scores(prediction[..., k], reference[..., k],
                                              None if uncertainty is None else uncertainty[..., k], case.brain[..., k],
                                              None if case.lesion is None else case.lesion[..., k])})
        if figures and (task, case.dataset) not in shown:  # one figure row per task and dataset
            shown[(task, case.dataset)] = _figure_row(inputs, task, results)
    _write_csv(rows, out / "scores.csv", overwrite)
    write_text(out / "summary.md", summary_markdown(rows, slice_stride=slice_stride, source_gamma=source_gamma),
               overwrite=overwrite)
    if figures:
        by_task = defaultdict(list)
        for (task, _), row in shown.items():
            by_task[task].append(row)
        for task, task_rows in by_task.items():
            montage(task_rows, out / "figures" / f"{task.name.replace('->', '_to_').replace('+', '-')}.png",
                    cell=160, title=f"{task.name}: images on [0, 1] (healthy-brain median = 1/3), |error| on [0, 0.5]",
                    overwrite=overwrite)
    return rows


def _fixed(image: np.ndarray, top: float) -> np.ndarray:
    """RGB uint8 of a 2D array on the fixed scale [0, top] (montage shows RGB panels as given)."""
    grey = (np.clip(image / top, 0, 1) * 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def _figure_row(case: EvalCase, task: Task, results: dict) -> tuple:
    """Inputs, real, each method's synthetic and |error|, and uncertainty, on the slice with most lesion
    (most brain without one). Images share the [0, 1] scale, errors [0, 0.5]; std maps are windowed.
    The real image carries the lesion's outline (drawn just outside it), so a reader finds on every
    synthetic where the lesion should be."""
    # only the scored slices (a method may leave the others empty), normalised as they are scored
    s = case.scored
    brain, lesion = case.brain[..., s], None if case.lesion is None else case.lesion[..., s]
    weights = (lesion if lesion is not None and lesion.any() else brain).sum(axis=(0, 1))
    k = int(np.argmax(weights))
    norm = lambda v: robust_normalise(v[..., s], brain, lesion)  # noqa: E731
    panels = [(m, _fixed(display(norm(case.images[m]), 2, k), 1.0)) for m in task.sources]
    real = norm(case.images[task.target])
    real_panel = _fixed(display(real, 2, k), 1.0)
    if lesion is not None and lesion[..., k].any():
        real_panel = outlined(real_panel, display(lesion, 2, k))
    panels.append((f"real {task.target}", real_panel))
    for name, (prediction, uncertainty) in results.items():
        synthetic = norm(prediction)
        panels.append((name, _fixed(display(synthetic, 2, k), 1.0)))
        panels.append(("|error|", _fixed(display(np.abs(synthetic - real), 2, k), 0.5)))
        if uncertainty is not None:
            panels.append(("uncertainty", display(uncertainty[..., s], 2, k)))
    return (f"{case.dataset}/{case.case_id}"[:28], panels)


def _write_csv(rows: list[dict], path: Path, overwrite: bool) -> None:
    with atomic_path(path, overwrite=overwrite) as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def aggregate(rows: list[dict]) -> dict[tuple[str, str, str], dict[str, tuple[float, float, int]]]:
    """(dataset, task, method) -> column -> (mean, std, cases) over cases, NaNs (no lesion) left out."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["dataset"], row["task"], row["method"])].append(row)
    table = {}
    for key, group in groups.items():
        table[key] = {}
        for column in SUMMARY_COLUMNS + SPREAD_COLUMNS + CONTRAST_COLUMNS + UNCERTAINTY_COLUMNS:
            values = np.array([float(r.get(column, "nan")) for r in group])
            values = values[~np.isnan(values)]
            table[key][column] = ((float(values.mean()), float(values.std()), len(values)) if len(values)
                                  else (math.nan, math.nan, 0))
    return table


def _cell(stat: tuple[float, float, int], digits: int) -> str:
    mean, std, n = stat
    if n == 0:
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def overview_markdown(rows: list[dict]) -> str:
    """Brain PSNR / SSIM per method and dataset, mean over that dataset's case-tasks, and over all."""
    order = list(dict.fromkeys(row["method"] for row in rows))
    datasets = sorted({row["dataset"] for row in rows})
    lines = ["| method | " + " | ".join(datasets) + " | all |", "|---" * (len(datasets) + 2) + "|"]
    for method in order:
        cells = []
        for dataset in [*datasets, None]:
            group = [r for r in rows if r["method"] == method and dataset in (None, r["dataset"])]
            if not group:
                cells.append("-")
                continue
            psnr_brain = np.mean([float(r["psnr_brain"]) for r in group])
            ssim_brain = np.mean([float(r["ssim_brain"]) for r in group])
            cells.append(f"{psnr_brain:.2f} / {ssim_brain:.3f} ({len(group)})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def baseline_wins(rows: list[dict], baselines: Sequence[str] = ("copy-nearest", "voxel-regression")
                  ) -> dict[str, tuple[int, int, list[str]]]:
    """Method -> (pairs won, pairs, the others): the (dataset, task) pairs where its mean brain PSNR
    and SSIM over cases are both above every baseline's (the issue's bar for the paper's tasks). Only
    pairs every baseline scored count; empty without the baselines."""
    table = aggregate(rows)
    present = [b for b in baselines if any(key[2] == b for key in table)]
    if len(present) < len(baselines):
        return {}
    wins = {}
    for method in dict.fromkeys(row["method"] for row in rows):
        if method in baselines:
            continue
        won, behind = 0, []
        pairs = sorted({key[:2] for key in table if key[2] == method and all((*key[:2], b) in table for b in baselines)})
        for pair in pairs:
            own = table[(*pair, method)]
            if all(own[c][0] > table[(*pair, b)][c][0] for b in baselines for c in ("psnr_brain", "ssim_brain")):
                won += 1
            else:
                behind.append(f"{pair[0]} {pair[1]}")
        wins[method] = (won, len(pairs), behind)
    return wins


def summary_markdown(rows: list[dict], slice_stride: int = 1, source_gamma: float = 1.0) -> str:
    """Mean ± std over cases per dataset, task and method (methods in the order evaluated); brain-masked
    columns first. ``source_gamma`` other than 1: a line says the sources were changed so."""
    table = aggregate(rows)
    split = "+".join(sorted({row["split"] for row in rows}))
    cases = defaultdict(set)
    for row in rows:
        cases[row["dataset"]].add(row["case"])
    lines = [
        f"Cases: {split} split ({'held out' if 'train' not in split else 'includes training cases'}); " + ", ".join(f"{d} {len(c)}" for d, c in sorted(cases.items()))
        + (f"; every {slice_stride}th axial slice" if slice_stride > 1 else "") + ".",
        f"Normalisation: {NORMALISATION}. Mean ± std over cases (a single case: its value).",
        *([f"Sources changed as another protocol might give them: each raised to the power {source_gamma:g} on "
           "the cache's [0, 1] scale (every method gets the same inputs; the reference is the real target)."]
          if source_gamma != 1 else []),
        "",
        "Overview: PSNR brain (dB) / SSIM brain, mean over each dataset's case-tasks (their number in brackets).",
        "",
        overview_markdown(rows),
        *[f"{method} beats both baselines on brain PSNR and SSIM in {won} of {total} (dataset, task) pairs"
          + (f"; not in: {'; '.join(behind)}." if behind else ".") for method, (won, total, behind) in baseline_wins(rows).items()],
        "",
        "Lesion contrast: mean lesion / mean healthy brain, synthetic vs real (the ratio of the two: 1 is "
        "faithful; a synthetic that draws normal tissue over the lesion is near 1 / real). Spread / corr: the "
        "synthetic brain's intensity spread (std) over the real one's, and their correlation; PSNR is best at "
        "spread = corr, so a method below spread 1 buys PSNR by flattening contrast, and only a higher "
        "correlation is a better image.",
        "",
        "| dataset | task | method | PSNR brain (dB) | SSIM brain | MAE brain | PSNR lesion | SSIM lesion "
        "| PSNR whole | SSIM whole | spread / corr brain | lesion contrast synth / real |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {method: i for i, method in enumerate(dict.fromkeys(row["method"] for row in rows))}  # as evaluated
    ranked = sorted(table.items(), key=lambda item: (*item[0][:2], order[item[0][2]]))
    for (dataset, task, method), stats in ranked:
        cells = [_cell(stats[c], 3 if c.startswith(("ssim", "mae")) else 2) for c in SUMMARY_COLUMNS[:7]]
        cells.append(_spread_cell(stats))
        cells.append(_contrast_cell(stats, "contrast_lesion"))
        lines.append(f"| {dataset} | {task} | {method} | " + " | ".join(cells) + " |")
    labelled = [(key, stats) for key, stats in ranked if any(stats[f"contrast_label{k}"][2] for k in (2, 3))]
    if labelled:
        lines += ["", "Lesion contrast per label (BraTS: 1 necrotic/non-enhancing core, 2 oedema, 3 enhancing), "
                  "synthetic / real, mean over cases:", "",
                  "| dataset | task | method | label 1 | label 2 | label 3 |", "|---|---|---|---|---|---|"]
        for (dataset, task, method), stats in labelled:
            cells = [_contrast_cell(stats, f"contrast_label{k}") for k in (1, 2, 3)]
            lines.append(f"| {dataset} | {task} | {method} | " + " | ".join(cells) + " |")
    uncertain = [(key, stats) for key, stats in ranked if stats["coverage"][2]]
    if uncertain:
        lines += ["", "Uncertainty (methods that state one): coverage of image ± uncertainty over brain voxels, in "
                  "the pipeline's own units (the nominal value is the pipeline's `coverage`), the same over the "
                  "lesion's voxels (where there is a lesion mask), and the Spearman rank correlation of the "
                  "uncertainty with |error| (0: it does not say where the errors are).", "",
                  "| dataset | task | method | coverage | coverage in the lesion | Spearman(uncertainty, abs error) |",
                  "|---|---|---|---|---|---|"]
        for (dataset, task, method), stats in uncertain:
            cells = [_cell(stats[c], 3) for c in UNCERTAINTY_COLUMNS]
            lines.append(f"| {dataset} | {task} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _spread_cell(stats: dict) -> str:
    spread, corr = stats["spread_brain"], stats["corr_brain"]
    return "-" if not spread[2] or not corr[2] else f"{spread[0]:.2f} / {corr[0]:.2f}"


def _contrast_cell(stats: dict, column: str) -> str:
    synthetic, real = stats[column], stats[f"{column}_real"]
    if not synthetic[2] or not real[2]:
        return "-"
    return f"{synthetic[0]:.2f} / {real[0]:.2f}"
