"""Do synthesized volumes look right in the planes a reader scrolls through? Stripes and checkerboards.

A slice-by-slice model can disagree with itself from one axial slice to the next (horizontal stripes in a
sagittal or coronal view); a model that predicts each pixel of a 2 x 2 patch with its own weights can
leave a period-2 checkerboard (fine lines). On one real BraTS case (T1 + T2 + FLAIR -> T1C; a phantom
glioma case when ``../shared/data`` is absent) this synthesizes the target with each pipeline and
reports, inside the brain, on the evaluation's scale (each volume / 3 x its healthy-brain median):

- ``axial_step``: mean |difference| between neighbouring axial slices (stripes when above the real one);
- ``inplane_step``: mean |difference| between neighbouring pixels along the second (A-P) axis;
- ``checkerboard``: mean |a - b - c + d| / 4 over every 2 x 2 block of an axial slice (the Haar HH
  band: near 0 for smooth anatomy, large for a pixel-level alternating pattern at any offset);
- ``nyquist``: the share of an axial slice's spectral power at period 2 along either axis (64 x 64
  crops at the brain's centre): the mesh of lines a patch-wise output can leave, which ``checkerboard``
  (the diagonal pattern only) misses;

- ``detail_corr_1`` / ``detail_corr_8``: the correlation of an axial slice's fine detail (the slice
  less its 2-pixel Gaussian blur) with that of the slice 1 / 8 slices up. In a real volume the detail
  of neighbouring slices is alike and that of slices 8 mm apart much less so; noise that is
  independent per slice lowers the first (stripes), noise shared by every slice raises the second
  (one texture drawn through the volume: vertical streaks);

``inplane_step`` is also a measure of sharpness: a blurred image has smaller neighbour differences
than the real one. A diffusion pipeline is scored twice, its point estimate (K samples) and its first
single sample, which should be the sharper of the two;

for the real volume too, and writes ``slice_consistency.png`` (mid-sagittal and coronal planes, real
then each pipeline) and ``slice_consistency.json``.

    python bench/slice_consistency.py PIPELINE [PIPELINE ...] [--target t1c] [--slab 0] \
        [--slice-noise smooth shared independent] [--out bench/results]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from mmdiff.evaluation.protocol import robust_normalise
from mmdiff.io import write_json
from mmdiff.pipelines import load_pipeline
from mmdiff.pipelines.common import call_defaults, diffusion_settings
from mmdiff.viz import montage

ROOT = Path(__file__).resolve().parents[1]
BRATS = ROOT / ".." / "shared" / "data" / "brats2018-sample"
#: a real BraTS case the published models held out (their training_info.json: AOZ is a test case)
DEFAULT_CASE = "Brats18_CBICA_AOZ_1"
SOURCES = ("t1", "t2", "flair")
FILE_NAMES = {"t1c": "t1ce"}


def load_case(target: str, name: str = DEFAULT_CASE):
    """``(inputs, reference, brain, lesion, dataset, description)``."""
    case = BRATS / name
    if case.is_dir():
        read = lambda m: np.asarray(nib.load(next(case.glob(f"*_{FILE_NAMES.get(m, m)}.nii.gz"))).dataobj,  # noqa: E731
                                    dtype=np.float32)
        images = {m: read(m) for m in SOURCES}
        reference, seg = read(target), read("seg")
        return images, reference, reference > 0, seg > 0, "brats", f"real BraTS 2018 {case.name}"
    from mmdiff.data.phantom import simulate_case

    case = simulate_case("glioma", 0, seed=0, spacing=1.0)
    return ({m: case.images[m] for m in SOURCES}, case.images[target], case.brain_mask, case.seg > 0, "glioma",
            "phantom glioma case 0")


def nyquist_share(volume: np.ndarray, brain: np.ndarray, slices: slice, size: int = 64) -> float:
    """Mean share of an axial slice's spectral power at period 2 along either in-plane axis, over
    ``size`` x ``size`` crops at the centre of the brain (a pixel-level mesh; real images: ~1e-4)."""
    shares = []
    for k in range(slices.start, slices.stop):
        rows, cols = np.flatnonzero(brain[..., k].any(1)), np.flatnonzero(brain[..., k].any(0))
        if len(rows) < size or len(cols) < size:
            continue
        r0, c0 = (rows[0] + rows[-1] - size) // 2, (cols[0] + cols[-1] - size) // 2
        crop = volume[r0:r0 + size, c0:c0 + size, k].astype(np.float64)
        power = np.abs(np.fft.fft2(crop - crop.mean())) ** 2
        shares.append((power[size // 2].sum() + power[:, size // 2].sum()) / max(power.sum(), 1e-12))
    return float(np.mean(shares)) if shares else float("nan")


def detail_correlation(volume: np.ndarray, brain: np.ndarray, slices: slice, lag: int) -> float:
    """Correlation of the in-plane fine detail (volume - its 2-pixel Gaussian blur) of slices ``lag`` apart."""
    v = volume.astype(np.float64)
    detail = v - gaussian_filter(v, sigma=(2, 2, 0))
    a, b = detail[..., slices.start:slices.stop - lag], detail[..., slices.start + lag:slices.stop]
    both = brain[..., slices.start:slices.stop - lag] & brain[..., slices.start + lag:slices.stop]
    return float(np.corrcoef(a[both], b[both])[0, 1])


def consistency(volume: np.ndarray, brain: np.ndarray, slices: slice) -> dict[str, float]:
    v, b = volume[..., slices], brain[..., slices]
    axial = (b[..., 1:] & b[..., :-1])
    inplane = (b[:, 1:] & b[:, :-1])
    block = b[1:, 1:] & b[:-1, 1:] & b[1:, :-1] & b[:-1, :-1]
    hh = np.abs(v[1:, 1:] - v[:-1, 1:] - v[1:, :-1] + v[:-1, :-1]) / 4
    return {"axial_step": float(np.abs(np.diff(v, axis=2))[axial].mean()),
            "inplane_step": float(np.abs(np.diff(v, axis=1))[inplane].mean()),
            "checkerboard": float(hh[block].mean()), "nyquist": nyquist_share(volume, brain, slices),
            "detail_corr_1": detail_correlation(volume, brain, slices, 1),
            "detail_corr_8": detail_correlation(volume, brain, slices, 8)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("pipelines", nargs="+", help="pipeline folders (gan / ldm: the published ones)")
    parser.add_argument("--target", default="t1c")
    parser.add_argument("--case", default=DEFAULT_CASE, help="a real BraTS 2018 case folder name (default: held-out AOZ; "
                                                           "the phantom glioma case 0 where the data is absent)")
    parser.add_argument("--steps", type=int, help="diffusion steps (ldm; default: the pipeline's)")
    parser.add_argument("--samples", type=int, help="K for a diffusion pipeline's point estimate (default: the pipeline's); its "
                                                               "first sample is shown and scored too")
    parser.add_argument("--slab", type=int, default=0, help="synthesize only this many central brain slices "
                                                            "(0: the whole volume; for the slow diffusion engine)")
    parser.add_argument("--slice-noise", nargs="+", default=[None], metavar="MODE",
                        help="a diffusion pipeline's slice_noise, one sample per mode (default: the pipeline's)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args()

    images, reference, brain, lesion, dataset, description = load_case(args.target, args.case)
    depth = np.flatnonzero(brain.any((0, 1)))
    if args.slab:
        middle = int(depth.mean())
        keep = slice(max(middle - args.slab // 2, 0), middle - args.slab // 2 + args.slab)
        images = {m: v[..., keep] for m, v in images.items()}
        reference, brain, lesion = reference[..., keep], brain[..., keep], lesion[..., keep]
        depth = np.flatnonzero(brain.any((0, 1)))
    slices = slice(int(depth[0] + 0.25 * len(depth)), int(depth[0] + 0.75 * len(depth)))  # the central half
    volumes = {"real": robust_normalise(reference, brain, lesion)}
    for source in args.pipelines:
        pipe = load_pipeline(source)
        pipe.set_progress_bar_config(disable=True)
        diffusion = pipe.engine == "ldm"
        path = Path(str(source))
        name = path.parent.name if path.name == "final" else path.name
        if diffusion:
            steps, samples = diffusion_settings(pipe, args.steps, args.samples)
            for n, mode in enumerate(args.slice_noise):
                mode = mode or call_defaults(pipe, "slice_noise")["slice_noise"]
                out = pipe(images=images, dataset=dataset, targets=[args.target], brain_mask=brain,
                           num_inference_steps=steps, num_samples=samples, return_samples=True,
                           generator=torch.Generator().manual_seed(0), slice_noise=mode)
                if n == 0:  # the point estimate hardly depends on the noise
                    volumes[f"{name} (K={samples})"] = robust_normalise(out.images[args.target], brain, lesion)
                volumes[f"{name} (one sample, {mode} noise)"] = robust_normalise(out.samples[args.target][0],
                                                                                 brain, lesion)
        else:
            out = pipe(images=images, dataset=dataset, targets=[args.target], brain_mask=brain)
            volumes[name] = robust_normalise(out.images[args.target], brain, lesion)
    record = {"case": description, "target": args.target, "sources": list(SOURCES),
              "axial_slices": [slices.start, slices.stop],
              "scale": "each volume / (3 x its healthy-brain median), clipped to [0, 1]",
              "results": {name: consistency(v, brain, slices) for name, v in volumes.items()}}
    out = Path(args.out)
    write_json(out / "slice_consistency.json", record)
    x_mid, y_mid = (int(np.mean(np.flatnonzero(brain.any(axis=(1, 2)))))), int(np.mean(np.flatnonzero(brain.any(axis=(0, 2)))))
    rows = []
    for name, v in volumes.items():
        sagittal, coronal = np.rot90(v[x_mid]), np.rot90(v[:, y_mid])
        rows.append((name, [("sagittal", sagittal), ("coronal", coronal)]))
    montage(rows, out / "slice_consistency.png", cell=240,
            title=f"{args.target} from {'+'.join(SOURCES)}, {description}: mid-sagittal and coronal planes")
    for name, values in record["results"].items():
        print(f"{name:40s} " + "  ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(f"wrote {out / 'slice_consistency.json'} and {out / 'slice_consistency.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
