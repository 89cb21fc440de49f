"""Refit the interval scale of an exported pipeline for its point estimate, on the training run's validation slices."""
import json, shutil, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from mmdiff.pipelines import MMDiffPipeline
from mmdiff.pipelines.ldm import calibrate_interval
from mmdiff.training.data import validation_samples, cache_path
from mmdiff.training.trainer import validation_condition

run, out, K = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
info = json.loads((run / "final" / "training_info.json").read_text())
config = info["config"]
pipe = MMDiffPipeline.from_pretrained(run / "final")
val = config.get("validation", {})
samples = validation_samples(config["data"], cache_path(config["data"]), int(val.get("slices_per_case", 2)),
                             int(val.get("cases_per_dataset", 1)))
names = info["datasets"]
slices = []
for i, s in enumerate(samples):
    sources, targets = validation_condition(s["available"], i, reconstruct=False)
    slices.append((s["images"], sources, targets, pipe.unet.config.dataset_names.index(names[s["dataset_id"]]), s["brain_mask"], None))
for estimate in ("posterior_mean", "sample_mean"):
    scale = calibrate_interval(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, slices, K, 10, pipe.config.coverage,
                               estimate, torch.Generator().manual_seed(1))
    print(estimate, "scale", scale, flush=True)
    if estimate == "posterior_mean":
        chosen = scale
pipe.register_to_config(interval_scale=chosen, calibration_samples=K, point_estimate="posterior_mean")
(out / "final").mkdir(parents=True, exist_ok=True)
pipe.save_pretrained(out / "final")
info["calibration"] = {"point_estimate": "posterior_mean", "samples": K, "interval_scale": chosen,
                       "slices": len(slices), "note": "refit after training with mmdiff.pipelines.ldm.calibrate_interval"}
(out / "final" / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
print("wrote", out / "final")
