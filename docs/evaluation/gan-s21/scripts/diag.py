"""Failing pairs: GAN vs regression; bias, affine-oracle PSNR, blend."""
import numpy as np, torch, sys
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, VoxelwiseRegression, robust_normalise, score
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline(sys.argv[1] if len(sys.argv) > 1 else "pipelines/mmdiff-gan", "gan")
gan = PipelineMethod(pipe, "gan"); reg = VoxelwiseRegression(cache)
pairs = [("glioma", "flair->dwi"), ("stroke", "flair->dwi"), ("ms", "t1+t2->flair"), ("ms", "t1->t1c"), ("wml", "t1+t2->flair")]
def psnr(p, r, m):
    return 10 * np.log10(1 / np.mean((p[m] - r[m]) ** 2))
for ds, t in pairs:
    task = Task.parse(t)
    for case in load_cases(cache, "test", [ds], slice_stride=4):
        real = case.images[task.target]
        g = gan(case, task)[0]; rg = reg(case, task)[0]
        sl = np.s_[..., ::4]
        m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
        R, G, RG = (robust_normalise(v[sl], m, les) for v in (real, g, rg))
        a, b = np.polyfit(G[m], R[m], 1)
        line = f"{ds:7s} {t:14s} gan {psnr(G,R,m):.2f} reg {psnr(RG,R,m):.2f} bias gan {np.mean(G[m]-R[m]):+.4f} reg {np.mean(RG[m]-R[m]):+.4f}"
        line += f" | gan affine-oracle {psnr(np.clip(a*G+b,0,1),R,m):.2f} (a={a:.2f}) | blend .5 {psnr(.5*G+.5*RG,R,m):.2f}"
        # smoothing the gan output a bit
        import scipy.ndimage as nd
        Gs = nd.gaussian_filter(G, (0.7, 0.7, 0)); line += f" | gan blur.7 {psnr(Gs,R,m):.2f}"
        print(line, flush=True)
