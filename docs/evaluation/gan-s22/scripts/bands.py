"""Error of GAN and regression split into bands: low (gaussian sigma 6 px), mid (1.5-6), high (<1.5)."""
import numpy as np, sys, scipy.ndimage as nd
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, VoxelwiseRegression, robust_normalise
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline(sys.argv[1] if len(sys.argv) > 1 else "pipelines/mmdiff-gan", "gan")
gan = PipelineMethod(pipe, "gan"); reg = VoxelwiseRegression(cache)
pairs = [("glioma", "flair->dwi"), ("stroke", "flair->dwi"), ("ms", "t1+t2->flair"), ("ms", "t1->t1c"), ("wml", "t1+t2->flair")]
def bands(e, m):
    e = np.where(m, e, 0.0)
    lo = nd.gaussian_filter(e, (6, 6, 0)); mid = nd.gaussian_filter(e, (1.5, 1.5, 0)) - lo; hi = e - lo - mid
    return [np.mean(b[m] ** 2) for b in (lo, mid, hi)]
for ds, t in pairs:
    task = Task.parse(t)
    for case in load_cases(cache, "test", [ds], slice_stride=4):
        real = case.images[task.target]; sl = np.s_[..., ::4]
        m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
        R, G, RG = (robust_normalise(v[sl], m, les) for v in (real, gan(case, task)[0], reg(case, task)[0]))
        bg, br = bands(G - R, m), bands(RG - R, m)
        print(f"{ds:7s} {t:14s} MSE x1e3 low/mid/high  gan " + " ".join(f"{1e3*x:.2f}" for x in bg)
              + "  reg " + " ".join(f"{1e3*x:.2f}" for x in br), flush=True)
