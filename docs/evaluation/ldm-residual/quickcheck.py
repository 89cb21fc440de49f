import json, sys, torch, numpy as np
torch.set_num_threads(1)
from pathlib import Path
from mmdiff.pipelines import MMDiffPipeline
from mmdiff.pipelines.ldm import sample_residuals, point_and_spread
from mmdiff.pipelines.common import to_network
from mmdiff.training.data import validation_samples, cache_path
from mmdiff.training.trainer import validation_condition
run = Path(sys.argv[1]); info = json.loads((run / "final" / "training_info.json").read_text()); config = info["config"]
pipe = MMDiffPipeline.from_pretrained(run / "final")
samples = validation_samples(config["data"], cache_path(config["data"]), 2, 2)
names = info["datasets"]; se_mu = se_pt = 0.0; n = 0; per = {}
for i, s in enumerate(samples):
    src, tgt = validation_condition(s["available"], i, reconstruct=False)
    x = to_network(s["images"][None])
    mu, r, e = sample_residuals(pipe.predictor, pipe.vae, pipe.unet, pipe.scheduler, x, src[None], pipe.unet.config.dataset_names.index(names[s["dataset_id"]]), 1, 10, torch.Generator().manual_seed(i), first_only=True)
    pt, _ = point_and_spread(mu, r, e, "posterior_mean")
    b = s["brain_mask"].bool(); m = tgt.nonzero().flatten().tolist()[0]
    a = ((mu[0, m] - x[0, m])[b] / 2).square().mean().item(); c = ((pt[0, m] - x[0, m])[b] / 2).square().mean().item()
    per.setdefault(names[s["dataset_id"]], []).append((a, c)); se_mu += a; se_pt += c; n += 1
for k, v in per.items():
    v = np.array(v); print(k, "PSNR mu %.2f point %.2f" % (10*np.log10(1/v[:,0].mean()), 10*np.log10(1/v[:,1].mean())))
print("all: mu %.2f dB, point %.2f dB" % (10*np.log10(n/se_mu), 10*np.log10(n/se_pt)))
