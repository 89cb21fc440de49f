"""The held-out WML subject's four largest lesions, zoomed: T1, T2, the real FLAIR and each synthetic FLAIR
(volumes written by `mmdiff synthesize --t1 ... --t2 ... --targets flair --dataset wml`), and the lesion
mask; prints each lesion's mean over the slice's normal brain (each volume over 3 x its healthy median).

    python wml_lesions.py 301D00262-20040114 A/flair_synthetic.nii.gz,B/flair_synthetic.nii.gz out.png
"""
import sys, nibabel as nib, numpy as np, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
C = sys.argv[1]; outs = sys.argv[2].split(","); png = sys.argv[3]
D = f"/work/shared/data/wml-cbica/{C}/{C}"
ld = lambda p: np.squeeze(np.asarray(nib.load(p).dataobj, dtype=np.float32))
t1, t2, fl = (ld(f"{D}.{m}.byte_nii.coreg.smooth.brain.correct.match.nii.gz") for m in ("T1", "T2", "FL"))
seg = ld(f"{D}.manual.mask.nii.gz") > 0
brain = ld(f"/work/shared/data/wml-cbica/{C}/{C}_foreground.nii.gz") > 0
syn = [ld(o) for o in outs]
def n(a):
    h = a[brain & ~seg]; return a / (3 * np.median(h[h > 0]))
cols = [("T1", n(t1)), ("T2", n(t2)), ("real FLAIR", n(fl))] + [(o.split("/")[-2], n(s)) for o, s in zip(outs, syn)]
from scipy import ndimage
lab, k = ndimage.label(seg); sizes = ndimage.sum(seg, lab, range(1, k + 1)); big = np.argsort(sizes)[::-1][:4]
fig, ax = plt.subplots(len(big), len(cols) + 1, figsize=(2.2 * (len(cols) + 1), 2.3 * len(big)))
for r, b in enumerate(big):
    cx, cy, cz = [int(v) for v in ndimage.center_of_mass(lab == b + 1)]
    sl = (slice(max(cx - 32, 0), cx + 32), slice(max(cy - 32, 0), cy + 32), cz)
    for c, (name, a) in enumerate(cols):
        ax[r, c].imshow(np.rot90(a[sl]), cmap="gray", vmin=0, vmax=1, interpolation="nearest"); ax[r, c].set_title(f"{name}", fontsize=7); ax[r, c].axis("off")
    ax[r, -1].imshow(np.rot90(seg[sl]), cmap="gray"); ax[r, -1].set_title(f"lesion z={cz} ({int(sizes[b])} vox)", fontsize=7); ax[r, -1].axis("off")
    m = (lab == b + 1)[..., cz]
    print(cz, " ".join(f"{name}: {a[..., cz][m].mean() / a[..., cz][brain[..., cz] & ~seg[..., cz]].mean():.2f}" for name, a in cols))
plt.tight_layout(); plt.savefig(png, dpi=80)
