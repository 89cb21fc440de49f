"""Downstream value of a synthetic sequence: brain-tumour segmentation Dice (the paper's Fig. 2c).

A small MONAI 2D U-Net is trained on the real sequences of the cache's BraTS training cases, twice:
with every sequence (``full``), and without the one being studied (``lacking``). On the held-out
cases, three conditions are scored by 3D Dice per case in the BraTS regions:

- ``real``: the full network on real inputs (the ceiling);
- ``synthetic``: the full network with the studied sequence replaced by a pipeline's synthesis of it
  from the others (what a site that never acquired it would get from mmdiff);
- ``lacking``: the network trained without that sequence (what the site could do without mmdiff).

Regions (labels as the cache stores them, BraTS 2023 numbering: 1 necrotic core, 2 oedema,
3 enhancing): whole tumour (WT) = 1|2|3, tumour core (TC) = 1|3, enhancing tumour (ET) = 3. A case
without a region in its reference and prediction scores Dice 1 there (MONAI's ``ignore_empty=False``).

MONAI provides the network, the loss and the metric; the training loop is the few lines below.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import UNet
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..data.cache import SEG, case_dir
from ..io import write_json, write_text
from .protocol import EvalCase, load_cases

REGIONS = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)}
CONDITIONS = ("real", "synthetic", "lacking")


def region_channels(seg: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Labels ``[...]`` -> float ``[3, ...]``: WT, TC, ET."""
    seg = torch.as_tensor(np.asarray(seg))
    return torch.stack([torch.isin(seg, torch.tensor(labels)) for labels in REGIONS.values()]).float()


def segmentation_net(in_channels: int) -> UNet:
    """A small 2D MONAI U-Net (about 0.5 M parameters): sequences in, WT/TC/ET logits out."""
    return UNet(spatial_dims=2, in_channels=in_channels, out_channels=len(REGIONS), channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=1)


def load_segmentation_cases(cache: str | Path, split: str | Sequence[str],
                            dataset: str = "brats") -> list[tuple[EvalCase, np.ndarray]]:
    """``(case, label map [X, Y, Z])`` for the labelled cases of a split (EvalCase keeps only a lesion mask)."""
    return [(case, np.load(case_dir(cache, case.dataset, case.case_id) / SEG).transpose(1, 2, 0))
            for case in load_cases(cache, split, datasets=[dataset]) if case.lesion is not None]


def train_segmentation(cases: list[tuple[EvalCase, np.ndarray]], sequences: Sequence[str], steps: int, batch_size: int = 8,
                       crop: int = 128, seed: int = 0, progress: bool = True) -> UNet:
    """Train :func:`segmentation_net` on random crops of brain slices (half of them through tumour)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    volumes = [np.stack([c.images[m] for m in sequences]) for c, _ in cases]  # [S, X, Y, Z]
    crop = min(crop, *volumes[0].shape[1:3])
    labels = [seg for _, seg in cases]
    tumour = [np.flatnonzero(seg.any(axis=(0, 1))) for seg in labels]
    brain = [np.flatnonzero(c.brain.any(axis=(0, 1))) for c, _ in cases]
    net = segmentation_net(len(sequences))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-5)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps)
    loss_fn = DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    net.train()
    for _ in tqdm(range(steps), desc=f"segmentation ({'+'.join(sequences)})", disable=not progress):
        images, targets = [], []
        for _ in range(batch_size):
            k = int(rng.integers(len(cases)))
            pool = tumour[k] if len(tumour[k]) and rng.random() < 0.5 else brain[k]
            z = int(rng.choice(pool))
            x0, y0 = (int(rng.integers(0, s - crop + 1)) for s in volumes[k].shape[1:3])
            image = volumes[k][:, x0:x0 + crop, y0:y0 + crop, z]
            target = labels[k][x0:x0 + crop, y0:y0 + crop, z]
            if rng.random() < 0.5:  # left-right flip
                image, target = image[:, ::-1], target[::-1]
            images.append(torch.from_numpy(np.ascontiguousarray(image)))
            targets.append(region_channels(np.ascontiguousarray(target)))
        loss = loss_fn(net(torch.stack(images)), torch.stack(targets))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return net.eval()


@torch.no_grad()
def segment(net: UNet, images: dict[str, np.ndarray], sequences: Sequence[str], brain: np.ndarray,
            batch_size: int = 16) -> np.ndarray:
    """Region masks ``[3, X, Y, Z]`` (bool) for a volume, slice by slice; nothing outside the brain."""
    stack = torch.from_numpy(np.stack([images[m] for m in sequences]).astype(np.float32))  # [S, X, Y, Z]
    out = torch.zeros((len(REGIONS),) + stack.shape[1:], dtype=torch.bool)
    for start in range(0, stack.shape[-1], batch_size):
        batch = stack[..., start:start + batch_size].permute(3, 0, 1, 2)
        out[..., start:start + batch_size] = (net(batch) > 0).permute(1, 2, 3, 0)
    return out.numpy() & brain[None]


def trained_network(folder: Path, name: str, cases: list[tuple[EvalCase, np.ndarray]], sequences: Sequence[str],
                    steps: int, seed: int, progress: bool) -> UNet:
    """:func:`train_segmentation`, or the network an earlier run saved in ``folder`` with the same recipe
    (sequences, steps, seed, training cases), so scoring another pipeline does not retrain."""
    recipe = {"sequences": list(sequences), "steps": steps, "seed": seed,
              "train_cases": [case.case_id for case, _ in cases]}
    weights, record = folder / f"{name}.safetensors", folder / f"{name}.json"
    if weights.exists() and record.exists() and json.loads(record.read_text()) == recipe:
        net = segmentation_net(len(sequences))
        net.load_state_dict(load_file(weights))
        return net.eval()
    net = train_segmentation(cases, sequences, steps, seed=seed, progress=progress)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(net.state_dict(), str(weights) + ".tmp")
    Path(str(weights) + ".tmp").replace(weights)
    write_json(record, recipe, overwrite=True)
    return net


def dice(prediction: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """3D Dice per region for region masks ``[3, X, Y, Z]`` against a label map ``[X, Y, Z]``."""
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    values = metric(torch.from_numpy(prediction[None]).float(), region_channels(labels)[None])[0]
    return {region: float(v) for region, v in zip(REGIONS, values)}


def downstream_dice(cache: str | Path, synthesize: Callable[[EvalCase, Sequence[str], str], np.ndarray],
                    out: str | Path, replace: str = "t1c", dataset: str = "brats", method: str = "mmdiff",
                    steps: int = 1500,
                    train_split: str = "train", test_split: Sequence[str] = ("val", "test"), seed: int = 0,
                    progress: bool = True, overwrite: bool = False) -> list[dict]:
    """Train the full and the lacking network, score the three conditions; write ``dice.csv`` and ``dice.md``.

    The networks are kept in ``out/networks`` and reused by a later run with the same recipe.

    ``synthesize(case, sources, target)`` returns the synthetic ``target`` ``[X, Y, Z]`` in the cache's
    [0, 1] scale (e.g. a pipeline's output for the case's other sequences).
    """
    out = Path(out)
    if (out / "dice.csv").exists() and not overwrite:
        raise FileExistsError(f"{out / 'dice.csv'} exists (pass overwrite=True / --overwrite to replace it)")
    train_cases = load_segmentation_cases(cache, train_split, dataset)
    test_cases = load_segmentation_cases(cache, list(test_split), dataset)
    if not train_cases or not test_cases:
        raise ValueError(f"the cache needs {dataset} cases with labels in both {train_split!r} and {list(test_split)}")
    sequences = list(train_cases[0][0].images)
    if replace not in sequences:
        raise ValueError(f"{replace!r} is not among the cases' sequences {sequences}")
    others = [m for m in sequences if m != replace]
    networks = out / "networks"
    full = trained_network(networks, "full", train_cases, sequences, steps, seed, progress)
    lacking = trained_network(networks, f"without-{replace}", train_cases, others, steps, seed, progress)
    rows = []
    for case, labels in tqdm(test_cases, desc="downstream cases", disable=not progress):
        synthetic = dict(case.images, **{replace: synthesize(case, others, replace)})
        predictions = {"real": segment(full, case.images, sequences, case.brain),
                       "synthetic": segment(full, synthetic, sequences, case.brain),
                       "lacking": segment(lacking, case.images, others, case.brain)}
        for condition, prediction in predictions.items():
            rows.append({"case": case.case_id, "split": case.split, "condition": condition,
                         **dice(prediction, labels)})
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "dice.csv.tmp", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "dice.csv.tmp").replace(out / "dice.csv")
    write_text(out / "dice.md", dice_markdown(rows, replace, method, len(train_cases), steps), overwrite=True)
    write_json(out / "dice.json", {"replace": replace, "method": method, "steps": steps, "seed": seed,
                                   "train_cases": [c.case_id for c, _ in train_cases], "rows": rows}, overwrite=True)
    return rows


def dice_markdown(rows: list[dict], replace: str, method: str, train_cases: int, steps: int) -> str:
    labels = {"real": "all real sequences", "synthetic": f"{replace.upper()} synthesised by {method}",
              "lacking": f"network trained without {replace.upper()}"}
    cases = sorted({r["case"] for r in rows})
    lines = [f"Segmentation Dice on {len(cases)} held-out case(s) ({', '.join(cases)}), mean +- std over cases;",
             f"MONAI 2D U-Net trained {steps} steps on {train_cases} training cases of real sequences.", "",
             "| condition | " + " | ".join(REGIONS) + " |", "|---|" + "---|" * len(REGIONS)]
    for condition in CONDITIONS:
        values = [[r[region] for r in rows if r["condition"] == condition] for region in REGIONS]
        cells = [f"{np.mean(v):.3f} +- {np.std(v):.3f}" for v in values]
        lines.append(f"| {labels[condition]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
