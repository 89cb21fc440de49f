import json, sys, torch, numpy as np
torch.set_num_threads(1)
from pathlib import Path
from mmdiff.pipelines import MMDiffPipeline
from mmdiff.pipelines.ldm import sample_residuals, point_and_spread
from mmdiff.pipelines.common import to_network, from_network
from mmdiff.training.data import validation_samples, cache_path
from mmdiff.training.trainer import validation_condition
from mmdiff.viz import montage
run = Path(sys.argv[1]); info = json.loads((run / "final" / "training_info.json").read_text()); config = info["config"]
pipe = MMDiffPipeline.from_pretrained(run / "final")
samples = validation_samples(config["data"], cache_path(config["data"]), 2, 2)
names = info["datasets"]; rows = []
show = lambda a: np.rot90(a.float().cpu().numpy())[:, ::-1]
for i, s in enumerate(samples):
    if names[s["dataset_id"]] not in ("brats", "glioma") or len(rows) >= 3:
        continue
    src, tgt = validation_condition(s["available"], i, reconstruct=False)
    x = to_network(s["images"][None]); m = tgt.nonzero().flatten().tolist()[0]
    mu, r, e = sample_residuals(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, x, src[None],
                                pipe.unet.config.dataset_names.index(names[s["dataset_id"]]), 4, 10, torch.Generator().manual_seed(0))
    pt, sd = point_and_spread(mu, r, e, "posterior_mean")
    b = s["brain_mask"].float()
    mod = pipe.modalities[m]
    rows.append((f"{names[s['dataset_id']]} {mod}", [(f"real {mod}", show(s["images"][m])), ("GAN mu", show(from_network(mu[0, m]) * b)),
                 ("mu + E[res]", show(from_network(pt[0, m]) * b)), ("one sample", show(from_network(mu[0, m] + r[0, 0, m]) * b)),
                 ("|error| point", show((from_network(pt[0, m]) - s["images"][m]).abs() * b)),
                 ("uncertainty", show(sd[0, m] / 2 * pipe.config.interval_scale * b))]))
montage(rows, Path(sys.argv[2]), cell=128, title="residual diffusion, validation slices (all-but-one)")
print("ok")
