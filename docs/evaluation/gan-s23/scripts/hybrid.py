"""Upper bound of shading transfer: the GAN's image with its low-pass (gaussian sigma) swapped for the regression's.
python hybrid.py [SPLIT [DATASET ...]]  (default: the test split, every pair below; `train ms`: the MS training patient)"""
import numpy as np, sys, scipy.ndimage as nd, torch
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, VoxelwiseRegression, robust_normalise
from mmdiff.evaluation import metrics
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline("/work/main/pipelines/mmdiff-gan", "gan")
gan = PipelineMethod(pipe, "gan"); reg = VoxelwiseRegression(cache)
pairs = [("glioma", "flair->dwi"), ("stroke", "flair->dwi"), ("ms", "t1+t2->flair"), ("ms", "t1->t1c"), ("wml", "t1+t2->flair"), ("brats", "t1+t2+flair->t1c"), ("glioma", "t1+t2+flair->adc")]
def lp(x, m, s):
    w = nd.gaussian_filter(m.astype(np.float32), (s, s, 0)); v = nd.gaussian_filter(np.where(m, x, 0), (s, s, 0))
    return np.where(w > 1e-3, v / np.maximum(w, 1e-3), 0)
def score(p, r, m):
    P = torch.from_numpy(p).permute(2, 0, 1); R = torch.from_numpy(r).permute(2, 0, 1); M = torch.from_numpy(m).permute(2, 0, 1)
    return float(metrics.psnr(P, R, M, pooled=True)), float(metrics.ssim(P, R, M, pooled=True))
split = sys.argv[1] if len(sys.argv) > 1 else "test"
if len(sys.argv) > 2:
    pairs = [p for p in pairs if p[0] in sys.argv[2:]]
for ds, t in pairs:
    task = Task.parse(t); acc = {}
    for case in load_cases(cache, split, [ds], slice_stride=4):
        sl = np.s_[..., ::4]; m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
        R, G, RG = (robust_normalise(v[sl], m, les) for v in (case.images[task.target], gan(case, task)[0], reg(case, task)[0]))
        outs = {"gan": G, "reg": RG}
        for s in (3, 6, 12):
            outs[f"hyb{s}"] = np.clip(G - lp(G, m, s) + lp(RG, m, s), 0, 1) * m
        outs["avg"] = 0.5 * (G + RG)
        for k, v in outs.items():
            acc.setdefault(k, []).append(score(v.astype(np.float32), R, m))
    print(f"{ds:7s} {t:18s} " + "  ".join(f"{k} {np.mean([a[0] for a in v]):.2f}/{np.mean([a[1] for a in v]):.3f}" for k, v in acc.items()), flush=True)
