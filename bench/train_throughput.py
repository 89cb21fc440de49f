"""Training throughput with MCBS at batch 16 against batch 1, for the LDM and the GAN, in one run.

PMM-Synth measured 8,724 s -> 2,078 s per epoch (4.2x) on an A100 from batching homogeneous MCBS
batches instead of single slices. This measures the same ratio for mmdiff's `cpu` configs on the
machine it runs on: slices per second of full training steps (forward, backward, optimizer) on
128 x 128 crops from the configured cache.

    python bench/train_throughput.py [--configs gan-cpu ldm-cpu] [--seconds 60] [--threads N]
                                     [--out bench/results/train_throughput.json] [KEY=VALUE ...]

Overrides apply to every config (e.g. data.cache=... for another cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from mmdiff.data.sampler import ModalityConsistentBatchSampler
from mmdiff.models import build_vae
from mmdiff.training import load_config
from mmdiff.training.data import ensure_cache, training_dataset
from mmdiff.training.stages import STAGES


def make_stage(config: dict, dataset, workdir: Path):
    """The stage a config trains; the LDM gets an untrained VAE of the configured size (speed only)."""
    extra = {}
    if config["stage"] == "ldm":
        vae_cfg = load_config(config["model"]["vae"]["config"])["model"]
        vae = build_vae(**{k: v for k, v in vae_cfg.items() if k not in ("discriminator", "loss")})
        vae.register_to_config(scaling_factor=0.5)
        vae.save_pretrained(workdir / "vae")
        extra["vae_path"] = workdir / "vae"
    stage = STAGES[config["stage"]](config, dataset.dataset_names, dataset.modalities, torch.device("cpu"), **extra)
    for model in stage.models.values():
        model.train()
    return stage


def slices_per_second(stage, dataset, batch_size: int, seconds: float, warmup: int = 2) -> dict:
    """Run full training steps on MCBS batches for about ``seconds``; slices per second after warm-up."""
    sampler = ModalityConsistentBatchSampler(dataset.groups, batch_size=batch_size, seed=0)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=0)
    accelerator = Accelerator(cpu=True)
    steps, slices, start = 0, 0, None
    while True:
        for batch in loader:
            stage.training_step(batch, accelerator, step=steps)
            steps += 1
            if steps == warmup:
                start = time.perf_counter()
            elif steps > warmup:
                slices += batch_size
                if time.perf_counter() - start >= seconds:
                    elapsed = time.perf_counter() - start
                    return {"batch_size": batch_size, "steps": steps - warmup, "seconds": round(elapsed, 2),
                            "slices_per_second": round(slices / elapsed, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["gan-cpu", "ldm-cpu"])
    parser.add_argument("--seconds", type=float, default=60.0, help="measured time per (config, batch size)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", default="bench/results/train_throughput.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.configs:
            config = load_config(name, args.overrides)
            dataset = training_dataset(config["data"], ensure_cache(config["data"]), seed=0)
            row = {"config": name, "stage": config["stage"], "crop": config["data"]["crop"]}
            for batch_size in (16, 1):
                stage = make_stage(config, dataset, Path(tmp))
                row[f"batch_{batch_size}"] = slices_per_second(stage, dataset, batch_size, args.seconds)
                print(name, row[f"batch_{batch_size}"], flush=True)
            row["speedup"] = round(row["batch_16"]["slices_per_second"] / row["batch_1"]["slices_per_second"], 2)
            results.append(row)
    report = {
        "benchmark": "training throughput, MCBS batch 16 vs batch 1",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "command": "python bench/train_throughput.py " + " ".join(
            [f"--configs {' '.join(args.configs)}", f"--seconds {args.seconds:g}", f"--threads {args.threads}",
             *args.overrides]),
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for row in results:
        print(f"{row['config']}: batch 16 {row['batch_16']['slices_per_second']} slices/s, batch 1 "
              f"{row['batch_1']['slices_per_second']} slices/s, speedup {row['speedup']}x")


if __name__ == "__main__":
    main()
