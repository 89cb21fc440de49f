"""Validation PSNR/SSIM inside the brain against training step, from runs' ``metrics.jsonl``.

    python bench/plot_validation.py RUN_DIR [RUN_DIR ...] --out docs/validation.png [--table]

Each RUN_DIR is a training run folder (``mmdiff train --output-dir``). Needs matplotlib
(``pip install matplotlib``, or the ``demo`` extra). ``--table`` prints a markdown table too.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def validation_records(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "val/psnr" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--table", action="store_true", help="also print a markdown table")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in args.runs:
        records = validation_records(run)
        if not records:
            continue
        steps = [r["step"] for r in records]
        label = f"{run.parent.name}/{run.name}" if run.name == "vae-stage" else run.name
        axes[0].plot(steps, [r["val/psnr"] for r in records], marker="o", label=label)
        axes[1].plot(steps, [r["val/ssim"] for r in records], marker="o", label=label)
        if args.table:
            names = sorted({k.split("_", 1)[1] for r in records for k in r if k.startswith("val/psnr_")})
            print(f"\n{label}\n\n| step | PSNR (dB) | SSIM | " + " | ".join(f"PSNR {n}" for n in names) + " |")
            print("|---" * (3 + len(names)) + "|")
            for r in records:
                per = " | ".join(f"{r.get(f'val/psnr_{n}', float('nan')):.2f}" for n in names)
                print(f"| {r['step']} | {r['val/psnr']:.2f} | {r['val/ssim']:.3f} | {per} |")
    for ax, name in zip(axes, ("PSNR inside the brain (dB)", "SSIM inside the brain")):
        ax.set_xlabel("training step")
        ax.set_title(f"validation {name}")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
