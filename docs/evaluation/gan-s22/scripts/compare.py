"""Merge evaluation scores.csv files (deterministic: same cache, seeds, stride) and print, per method,
the overview (brain PSNR / SSIM per dataset, mean over case-tasks) and the pairs still behind a baseline.

python compare.py SCORES.csv [SCORES.csv ...]
"""
import sys
import pandas as pd

frames = [pd.read_csv(p) for p in sys.argv[1:]]
df = pd.concat(frames).drop_duplicates(subset=["dataset", "case", "task", "method"])
base = ("copy-nearest", "voxel-regression")
pair = df.groupby(["dataset", "task", "method"])[["psnr_brain", "ssim_brain"]].mean().reset_index()
best = pair[pair.method.isin(base)].groupby(["dataset", "task"])[["psnr_brain", "ssim_brain"]].max()
ds = sorted(df.dataset.unique())
print("| method | " + " | ".join(ds) + " | all | pairs ahead |")
for method in [m for m in df.method.unique() if m not in base] + list(base):
    d = df[df.method == method]
    cells = [f"{d[d.dataset == x].psnr_brain.mean():.2f} / {d[d.dataset == x].ssim_brain.mean():.3f}" for x in ds]
    p = pair[pair.method == method].set_index(["dataset", "task"])
    ahead = ((p.psnr_brain > best.psnr_brain) & (p.ssim_brain > best.ssim_brain)).reindex(best.index)
    behind = [f"{a} {b}" for (a, b), v in ahead.items() if not v]
    cell = "" if method in base else f"{int(ahead.sum())} of {len(best)}; behind: {', '.join(behind)}"
    print(f"| {method} | " + " | ".join(cells) + f" | {d.psnr_brain.mean():.2f} / {d.ssim_brain.mean():.3f} | {cell} |")
watch = [("glioma", "flair->dwi"), ("stroke", "flair->dwi"), ("ms", "t1+t2->flair"), ("ms", "t1->t1c"), ("ms", "t1+t2+flair->t1c")]
print("\npairs behind (PSNR / SSIM):")
for a, b in watch:
    q = pair[(pair.dataset == a) & (pair.task == b)]
    print(f"{a} {b}: " + "; ".join(f"{r.method} {r.psnr_brain:.2f}/{r.ssim_brain:.3f}" for r in q.itertuples()))
