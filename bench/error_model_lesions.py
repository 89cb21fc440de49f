"""How the error model's scale compares with the predictor's error in lesions and in normal brain.

For each pipeline and cached case, on every other axial slice that holds a lesion: the mean |error| of
the predictor (``mu``, [-1, 1] units) in the lesion and in normal-appearing brain, the error model's
mean scale ``b`` there, and the coverage of ``mu +- sqrt(2) b x the target's calibrated scale`` (the K = 1
interval):

    python bench/error_model_lesions.py PIPELINE[,PIPELINE] DATASET/CASE[,DATASET/CASE] SOURCES->TARGET
    python bench/error_model_lesions.py pipelines/mmdiff-ldm wml/301D00262-20040114,wml/301D00252-20040121 't2->flair'

Reads the cache ``~/.cache/mmdiff/cpu-v2`` (``configs/data-cpu.yaml``).
"""
import sys, json, numpy as np, torch
from pathlib import Path
from mmdiff.pipelines import MMDiffPipeline
from mmdiff.pipelines.common import to_network
from mmdiff.pipelines.ldm import predictor_mean_inside_brain
torch.set_num_threads(2)
cache = Path.home() / ".cache/mmdiff/cpu-v2"
cases = sys.argv[2].split(",")
src, tgt = sys.argv[3].split("->")
src = src.split("+")
for path in sys.argv[1].split(","):
    pipe = MMDiffPipeline.from_pretrained(path)
    em, pred = pipe.error_model, pipe.predictor
    names = pipe.unet.config.dataset_names
    mods = pipe.modalities
    for case in cases:
        ds, cid = case.split("/")
        d = cache / "cases" / ds / cid
        img = np.load(d / "images.npy", mmap_mode="r"); seg = np.load(d / "seg.npy", mmap_mode="r"); brain = np.load(d / "brain_mask.npy", mmap_mode="r")
        meta = json.loads((d / "meta.json").read_text())
        # images: [M, Z?, H, W] or similar
        zs = [z for z in range(0, img.shape[0], 2) if seg[z].sum() > 20]
        x = torch.zeros(len(zs), len(mods), img.shape[2], img.shape[3])
        for c, m in enumerate(meta["modalities"]):
            x[:, mods.index(m)] = torch.from_numpy(np.ascontiguousarray(img[zs, c])).float()
        sources = torch.tensor([m in src for m in mods])
        did = names.index(ds) if ds in names else -1
        with torch.no_grad():
            xn = to_network(x)
            mu = predictor_mean_inside_brain(pred, pred(xn, sources, did), torch.from_numpy(np.asarray(brain[zs]) > 0))
            lb = em(torch.where(sources[None, :, None, None], xn, mu), sources, did)
        t = mods.index(tgt)
        e = (xn[:, t] - mu[:, t]).abs().numpy(); b = lb[:, t].exp().numpy()
        s = np.asarray(seg[zs]) > 0; br = np.asarray(brain[zs]) > 0
        norm = br & ~s
        scale = pipe.interval_scale_for(tgt)
        cov_l = (e[s] <= np.sqrt(2) * b[s] * scale).mean(); cov_n = (e[norm] <= np.sqrt(2) * b[norm] * scale).mean()
        print(f"{Path(path).name} {case} {'+'.join(src)}->{tgt}: slices {len(zs)}  |e| lesion {e[s].mean():.3f} normal {e[norm].mean():.3f} ratio {e[s].mean()/e[norm].mean():.2f} | b lesion {b[s].mean():.3f} normal {b[norm].mean():.3f} ratio {b[s].mean()/b[norm].mean():.2f} | cov lesion {cov_l:.2f} normal {cov_n:.2f}")
