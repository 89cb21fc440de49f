"""Low-pass (sigma 6 px) error maps of GAN and regression, a few slices, for the pairs behind."""
import numpy as np, sys, scipy.ndimage as nd, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
from mmdiff.evaluation.protocol import load_cases, Task, PipelineMethod, VoxelwiseRegression, robust_normalise
from mmdiff.pipelines import load_pipeline
cache = "/root/.cache/mmdiff/cpu-v2"
pipe = load_pipeline(sys.argv[1] if len(sys.argv) > 1 else "pipelines/mmdiff-gan", "gan"); gan = PipelineMethod(pipe, "gan"); reg = VoxelwiseRegression(cache)
pairs = [("stroke", "flair->dwi"), ("ms", "t1+t2->flair")]
fig, axes = plt.subplots(4, 6, figsize=(18, 12))
for r, (ds, t) in enumerate(pairs):
    task = Task.parse(t)
    case = next(iter(load_cases(cache, "test", [ds], slice_stride=4)))
    sl = np.s_[..., ::4]; m = case.brain[sl]; les = None if case.lesion is None else case.lesion[sl]
    R, G, RG = (robust_normalise(v[sl], m, les) for v in (case.images[task.target], gan(case, task)[0], reg(case, task)[0]))
    n = m.shape[-1]; zs = [n // 3, n // 2, 2 * n // 3]
    for j, z in enumerate(zs):
        for k, (name, P) in enumerate((("gan", G), ("reg", RG))):
            e = nd.gaussian_filter(np.where(m, P - R, 0), (6, 6, 0))[..., z]
            ax = axes[2 * r + k, 2 * j]; ax.imshow(np.where(m[..., z], e, np.nan).T, cmap="RdBu_r", vmin=-.05, vmax=.05, origin="lower"); ax.set_title(f"{ds} {t} {name} low-pass err z{z}", fontsize=8)
            ax = axes[2 * r + k, 2 * j + 1]; ax.imshow((P if k == 0 else R)[..., z].T, cmap="gray", vmin=0, vmax=1, origin="lower"); ax.set_title(("gan" if k == 0 else "real"), fontsize=8)
for a in axes.flat: a.axis("off")
plt.tight_layout(); plt.savefig("/work/eval/s22/lowpass.png", dpi=60)
