"""How much of the WML FLAIR lesion contrast survives an in-plane blur of the real FLAIR (sigma px)?"""
import numpy as np, scipy.ndimage as nd
from mmdiff.evaluation.protocol import load_cases, lesion_contrast
cache = "/root/.cache/mmdiff/cpu-v2"
for ds in ("wml", "ms", "brats"):
    rows = []
    for split in ("train", "val", "test"):
        for case in load_cases(cache, split, [ds], slice_stride=4):
            if case.lesion is None or not case.lesion.any(): continue
            sl = np.s_[..., ::4]; m = case.brain[sl]; les = case.lesion[sl]; f = np.where(m, case.images["flair"][sl], 0)
            rows.append([lesion_contrast(np.where(m, nd.gaussian_filter(f, (s, s, 0)), 0), m, les) if s else lesion_contrast(f, m, les) for s in (0, 0.7, 1.0, 1.5, 2.0)])
    print(ds, "FLAIR lesion contrast, real blurred sigma 0 / 0.7 / 1 / 1.5 / 2 px:", " / ".join(f"{v:.2f}" for v in np.mean(rows, 0)), f"({len(rows)} cases)", flush=True)
