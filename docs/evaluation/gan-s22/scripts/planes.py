"""Axial, coronal and sagittal planes through a held-out BraTS case's tumour: source T1, real and synthetic
T1C (from T1 + T2 + FLAIR) and FLAIR (from T1 + T2), |error| (each volume over 3 x its healthy-brain median).

python planes.py CASE_PREFIX SYNTH_DIR OUT.png   (SYNTH_DIR: t1c_synthetic.nii.gz and flair_synthetic.nii.gz)
"""
import sys
import nibabel as nib, numpy as np, matplotlib; matplotlib.use("Agg"); import matplotlib.pyplot as plt
prefix, synth, out = sys.argv[1:4]
load = lambda p: np.asarray(nib.load(p).dataobj, dtype=np.float32)
seg = load(f"{prefix}_seg.nii.gz"); brain = load(f"{prefix}_t1.nii.gz") > 0
scale = lambda v: v / (3 * np.median(v[brain & (seg == 0)]))
c = [int(np.median(i)) for i in np.nonzero(seg)]
rows = {"t1": scale(load(f"{prefix}_t1.nii.gz"))}
for m in ("t1c", "flair"):
    real, fake = scale(load(f"{prefix}_{ {'t1c': 't1ce'}.get(m, m)}.nii.gz")), scale(load(f"{synth}/{m}_synthetic.nii.gz"))
    rows |= {f"real {m}": real, f"synthetic {m}": fake, f"|error| {m}": np.abs(fake - real) * brain}
planes = {"axial": lambda v: v[:, :, c[2]].T, "coronal": lambda v: v[:, c[1], :].T, "sagittal": lambda v: v[c[0], :, :].T}
fig, axes = plt.subplots(3, len(rows), figsize=(2.2 * len(rows), 6.6))
for i, (plane, cut) in enumerate(planes.items()):
    for j, (name, v) in enumerate(rows.items()):
        axes[i, j].imshow(cut(v), cmap="magma" if name.startswith("|") else "gray", vmin=0, vmax=0.5 if name.startswith("|") else 1, origin="lower")
        axes[i, j].set_title(f"{name} ({plane})", fontsize=7); axes[i, j].axis("off")
plt.tight_layout(); plt.savefig(out, dpi=60)
