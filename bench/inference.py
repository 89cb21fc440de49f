"""Inference speed and memory of the published pipelines, against a naive loop and the compute floor.

On one real BraTS case (T1 + T2 + FLAIR -> T1C, 240 x 240 x 155) when ``../shared/data`` has it, else
on a phantom glioma case, this measures in one run:

- the machine's matmul rate (float32 GEMM, GFLOP/s), and each network's FLOPs per slice
  (``torch.utils.flop_counter``), which give the compute floor: FLOPs x steps / matmul rate;
- the GAN pipeline on the whole volume, then one fast-path change at a time: batch 1 / 8 / 32,
  ``torch.inference_mode``, float32 against bf16 autocast (the pipelines' ``precision``; every other
  row runs at the default, ``"auto"``, recorded as ``precision_auto``), channels-last weights,
  ``torch.compile`` (``--compile``);
- the diffusion pipeline at its default steps (DPM-Solver++) for K = 1 / 2 / 4 / 8 samples, on
  ``--ldm-slices`` brain slices (0: the whole volume), reported per slice and scaled to the case's
  brain slices;
- the naive baseline: a Python loop over all 155 axial slices, one slice per call, K = 4, no
  skipping of empty slices (timed on ``--naive-slices`` slices, scaled to 155; 0 skips it);
- peak memory of each row: CUDA ``max_memory_allocated`` on a GPU; on CPU the process's peak
  resident set (``VmHWM``), reset before each row by writing 5 to ``/proc/self/clear_refs``.

    python bench/inference.py [--gan pipelines/mmdiff-gan] [--ldm pipelines/mmdiff-ldm]
        [--device cpu|cuda] [--threads N] [--ldm-slices 16] [--naive-slices 4] [--compile]
        [--out bench/results/inference.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from contextlib import nullcontext
from datetime import datetime, timezone
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmdiff.models.vae import encode_modalities
from mmdiff.pipelines import MMDiffPipeline, MMGANPipeline, resolve_precision
from mmdiff.pipelines.common import diffusion_settings, prepare_inputs, to_network

SOURCES, TARGET = ("t1", "t2", "flair"), "t1c"
BRATS_CASE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "brats2018-sample" / "Brats18_CBICA_AME_1"


def load_case() -> tuple[dict, str, str]:
    """Inputs (NIfTI paths or arrays), the dataset name, and a description of the case."""
    if BRATS_CASE.is_dir():
        files = {m: next(BRATS_CASE.glob(f"*_{m}.nii.gz")) for m in SOURCES}
        return {m: str(p) for m, p in files.items()}, "brats", f"real BraTS 2018 {BRATS_CASE.name}, 240x240x155"
    from mmdiff.data.phantom import simulate_case  # no real data here: a phantom glioma case at 1 mm
    case = simulate_case("glioma", 0, seed=0, spacing=1.0)
    images = {m: case.images[m] for m in SOURCES}
    return images, "glioma", f"phantom glioma case 0, {'x'.join(map(str, images['t1'].shape))}"


def matmul_gflops(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """Best float32 GEMM rate over ``repeats`` (GFLOP/s)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    best = float("inf")
    for _ in range(repeats + 1):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def flops(fn) -> int:
    """Floating-point operations (multiply-add = 2) of one call."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:  # Linux: "5" resets the peak resident set size (VmHWM) of the process
        Path("/proc/self/clear_refs").write_text("5")


def peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(device: torch.device, fn, context=None) -> tuple[float, float]:
    """(seconds, peak MiB) of one call."""
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    with context or nullcontext():
        fn()
    sync(device)
    return time.perf_counter() - start, peak_mib(device)


def bench_gan(path: str, images: dict, dataset: str, device: torch.device, rate: float, compile_: bool) -> dict:
    pipe = MMGANPipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)
    case = prepare_inputs(images, pipe.modalities, [TARGET], None, pipe.downsampling, "np", None)
    brain_slices, total_slices = len(case.slices), case.num_slices
    x = torch.zeros(1, len(pipe.modalities), *case.images.shape[1:3], device=device)
    sources = torch.as_tensor(case.source_mask, device=device)
    slice_flops = flops(lambda: pipe.generator(x, sources, 0))

    def run(batch_size=8, precision="auto"):
        return lambda: pipe(images, dataset=dataset, targets=[TARGET], batch_size=batch_size, precision=precision)

    run()()  # warm-up (first-call allocations, thread pools)
    rows = []
    seconds, peak = timed(device, lambda: prepare_inputs(images, pipe.modalities, [TARGET], None, pipe.downsampling,
                                                         "np", None))
    rows.append({"engine": "gan", "variant": "preprocessing only (read, brain mask, normalise)",
                 "seconds_per_volume": seconds, "seconds_per_brain_slice": seconds / brain_slices, "peak_mib": peak})

    def row(name, fn, context=None):
        seconds, peak = timed(device, fn, context)
        rows.append({"engine": "gan", "variant": name, "seconds_per_volume": seconds,
                     "seconds_per_brain_slice": seconds / brain_slices, "peak_mib": peak})
        print(f"gan {name}: {seconds:.2f} s/volume, {peak:.0f} MiB", flush=True)

    for batch_size in (1, 8, 32):
        row(f"batch {batch_size} (no_grad, skip non-brain)", run(batch_size))
    row("batch 8 + inference_mode", run(8), torch.inference_mode())
    for precision in ("float32", "bfloat16"):  # the default ("auto") is one of them: resolve_precision says which
        row(f"batch 8, {precision}" + (" autocast" if precision == "bfloat16" else ""), run(8, precision))
    pipe.generator.to(memory_format=torch.channels_last)
    run()()
    row("batch 8 + channels_last", run(8))
    pipe.generator.to(memory_format=torch.contiguous_format)
    if compile_:
        pipe.generator = torch.compile(pipe.generator, dynamic=False)
        compile_seconds, _ = timed(device, run(8))
        row("batch 8 + torch.compile (after compiling)", run(8))
        rows[-1]["compile_seconds"] = compile_seconds
    floor = slice_flops / (rate * 1e9)
    return {"precision_auto": resolve_precision("auto", device), "flops_per_slice": slice_flops,
            "brain_slices": brain_slices, "slices": total_slices,
            "floor_seconds_per_volume": floor * brain_slices, "rows": rows}


def bench_ldm(path: str, images: dict, dataset: str, device: torch.device, rate: float,
              ldm_slices: int, naive_slices: int) -> dict:
    """The residual diffusion pipeline at its default steps for K = 1, 2, 4, 8 samples (K = 1: the
    posterior-mean point estimate, one UNet step; the pipeline's default K is marked), and the naive
    per-slice loop at K = 4."""
    pipe = MMDiffPipeline.from_pretrained(path).to(device)
    pipe.set_progress_bar_config(disable=True)
    steps, default_k = diffusion_settings(pipe)
    case = prepare_inputs(images, pipe.modalities, [TARGET], None, pipe.downsampling, "np", None)
    brain_slices, total_slices = len(case.slices), case.num_slices
    dataset_id = pipe.unet.config.dataset_names.index(dataset)
    source_mask = torch.as_tensor(case.source_mask, device=device)

    image = torch.zeros(1, len(pipe.modalities), *case.images.shape[1:3], device=device)
    predictor_flops = flops(lambda: pipe.predictor(to_network(image), source_mask, dataset_id))
    latents = encode_modalities(pipe.vae, image)
    unet_flops = flops(lambda: pipe.unet(latents, torch.tensor([500], device=device), latents, source_mask, dataset_id))

    # the pipeline itself on a sub-volume of evenly spaced brain slices, so the per-slice time scales to the volume
    arrays = {m: v if isinstance(v, np.ndarray) else nib.as_closest_canonical(nib.load(v)).get_fdata(dtype=np.float32)
              for m, v in images.items()}
    chosen = case.slices if ldm_slices <= 0 else case.slices[
        np.linspace(0, brain_slices - 1, min(ldm_slices, brain_slices)).round().astype(int)]
    sub_volume = {m: np.ascontiguousarray(v[..., chosen]) for m, v in arrays.items()}

    def run_pipeline(samples, batch_size=8):
        def fn():
            pipe(sub_volume, dataset=dataset, targets=[TARGET], num_inference_steps=steps, num_samples=samples,
                 batch_size=batch_size, generator=torch.Generator(device).manual_seed(0))
        return fn

    run_pipeline(1)()  # warm-up
    rows = []

    def row(name, fn, slices, unet_steps, context=None, scale_to=brain_slices):
        seconds, peak = timed(device, fn, context)
        per_slice = seconds / slices
        floor = (predictor_flops + unet_steps * unet_flops) / (rate * 1e9)
        rows.append({"engine": "ldm", "variant": name, "steps": unet_steps, "slices_timed": slices,
                     "seconds_per_slice": per_slice, "seconds_per_volume": per_slice * scale_to,
                     "volume_slices": scale_to, "floor_seconds_per_volume": floor * scale_to, "peak_mib": peak})
        print(f"ldm {name}: {per_slice:.2f} s/slice, {per_slice * scale_to:.0f} s/volume, {peak:.0f} MiB", flush=True)

    mark = lambda k: " (the default)" if k == default_k else ""  # noqa: E731
    row(f"K = 1 (posterior mean: predictor + 1 UNet step), batch 8{mark(1)}", run_pipeline(1), len(chosen), 1)
    for samples in (2, 4, 8):
        row(f"K = {samples}, {steps} DPM-Solver++ steps, batch 8{mark(samples)}", run_pipeline(samples), len(chosen),
            samples * steps)

    # naive: one pipeline call per axial slice, brain or not (an all-ones mask), K = 4
    naive_index = np.linspace(0, total_slices - 1, naive_slices).round().astype(int)

    def naive():
        for k in naive_index:
            slice_2d = {m: np.ascontiguousarray(v[..., k]) for m, v in arrays.items()}
            pipe(slice_2d, dataset=dataset, targets=[TARGET], num_inference_steps=steps, num_samples=4, batch_size=1,
                 brain_mask=np.ones(slice_2d[SOURCES[0]].shape), generator=torch.Generator(device).manual_seed(0))

    if naive_slices > 0:
        row("naive: per-slice loop, all slices, K = 4, batch 1", naive, naive_slices, 4 * steps,
            scale_to=total_slices)
    return {"precision_auto": resolve_precision("auto", device),
            "flops_per_slice": {"predictor": predictor_flops, "unet_step": unet_flops},
            "brain_slices": brain_slices, "slices": total_slices, "rows": rows}


def markdown(result: dict) -> str:
    """The result as the tables BENCHMARKS.md shows (the engines that were timed)."""
    gan, ldm = result.get("gan"), result.get("ldm")
    counted = gan or ldm
    lines = [f"Case: {result['case']} ({counted['brain_slices']} of {counted['slices']} axial slices hold brain). "
             f"Machine: {result['machine']}; float32 matmul {result['matmul_gflops']:.0f} GFLOP/s. "
             f"Date: {result['date'][:10]}. Command: `{result['command']}`", "",
             "| engine | variant | s / volume | s / brain slice | compute floor s / volume | peak memory MiB |",
             "|---|---|---|---|---|---|"]
    for row in gan["rows"] if gan else []:
        floor = "" if "preprocessing" in row["variant"] else f"{gan['floor_seconds_per_volume']:.1f}"
        lines.append(f"| GAN | {row['variant']} | {row['seconds_per_volume']:.1f} | "
                     f"{row['seconds_per_brain_slice']:.3f} | {floor} | {row['peak_mib']:.0f} |")
    for row in ldm["rows"] if ldm else []:
        lines.append(f"| LDM | {row['variant']} | {row['seconds_per_volume']:.0f} ({row['volume_slices']} slices, "
                     f"{row['slices_timed']} timed) | {row['seconds_per_slice']:.2f} | "
                     f"{row['floor_seconds_per_volume']:.0f} | {row['peak_mib']:.0f} |")
    notes = []
    if gan:
        notes.append(f"GAN generator {gan['flops_per_slice'] / 1e9:.1f} G")
    if ldm:
        flops = ldm["flops_per_slice"]
        notes.append(f"LDM predictor {flops['predictor'] / 1e9:.1f} G, residual UNet {flops['unet_step'] / 1e9:.1f} G "
                     "per step (the Haar latent is free)")
    lines += ["", "FLOPs per slice: " + "; ".join(notes) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gan", default=str(root / "pipelines" / "mmdiff-gan"))
    parser.add_argument("--ldm", default=str(root / "pipelines" / "mmdiff-ldm"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--ldm-slices", type=int, default=16, help="brain slices timed for the LDM (0: all)")
    parser.add_argument("--naive-slices", type=int, default=4, help="slices timed for the naive loop")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile for the GAN")
    parser.add_argument("--engines", nargs="+", choices=["gan", "ldm"], default=["gan", "ldm"],
                        help="the engines to time (default: both)")
    parser.add_argument("--out", default=str(root / "bench" / "results" / "inference.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    images, dataset, description = load_case()
    rate = matmul_gflops(device)
    print(f"{description}; float32 matmul {rate:.1f} GFLOP/s on {device}", flush=True)
    machine = (torch.cuda.get_device_name() if device.type == "cuda"
               else f"{platform.machine()}, {torch.get_num_threads()} threads")
    result = {
        "benchmark": "inference, T1+T2+FLAIR -> T1C", "case": description,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{machine}, torch {torch.__version__}", "device": str(device),
        "command": "python bench/inference.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
            if k in ("threads", "ldm_slices", "naive_slices") and v is not None) + (" --compile" if args.compile else ""),
        "matmul_gflops": rate,
    }
    if "gan" in args.engines:
        result["gan"] = bench_gan(args.gan, images, dataset, device, rate, args.compile)
    if "ldm" in args.engines:
        result["ldm"] = bench_ldm(args.ldm, images, dataset, device, rate, args.ldm_slices, args.naive_slices)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
