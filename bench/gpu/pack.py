"""Pack what the lent GPU machine needs to train the one-step predictor, within its 64 MiB transfer.

Runs here (on a CPU machine), from the checkout that will call the device tool::

    python bench/gpu/pack.py [--cache ~/.cache/mmdiff/cpu-v2] [--budget-mib N] [--no-wheels]

Writes into ``.gpu/`` (ignored by git; the device call names it in ``carry``):

- ``pack.json``: the source cache's ``cache.json`` and ``splits.json``, the phantom cohorts' recipe
  (regenerated on the device: the same seed gives the same bytes), and per packed case its
  ``meta.json`` and array shapes;
- ``cases/<dataset>__<case>.npz``: one per packed real-cohort case, its images quantised to uint8
  (``round(v * 255)``; the cache holds [0, 1]), each slice's in-plane 2D difference taken (a PNG-like
  filter, undone by two cumulative sums) and zlib-compressed; the brain mask (bit-packed) and seg zlib'd;
- ``site.tar.xz``: diffusers, monai and nibabel (which the device lacks) installed here from their
  wheels with ``pip install --target`` and packed with xz (half the size of the wheels themselves).

Cases are training-split cases of the real cohorts (every dataset but the phantom cohorts), taken whole,
round-robin across datasets, while they fit the budget: by default what is left of 64 MiB after the
files that travel anyway (git's tracked and untracked-not-ignored files, ``shared/``), the packages
and a safety margin.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from mmdiff.data.cache import (BRAIN_MASK, IMAGES, META, SEG, SPLITS_JSON,  # noqa: E402
                               case_folder, read_index, read_info, safe_name)

MIB = 1 << 20
LIMIT_MIB = 64.0  # the device tool's working-tree limit, carried paths included
PHANTOM_DATASETS = ("glioma", "immune", "bratslike", "stroke")
PACKAGES = ("diffusers==0.42.1", "monai==1.6.1", "nibabel==5.4.2")  # what the device's image lacks
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "any")
CODEC = "uint8-dxdy-zlib"  # see encode_images
PACK_FORMAT = 1
WHEEL_CACHE = Path(os.path.expanduser("~/.cache/mmdiff/gpu-wheels"))


# ------------------------------------------------------------------------------------------ codec
def quantise(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 (the error is at most 1/510)."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def dequantise(q: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) / 255.0).astype(np.float16)


def encode_images(images: np.ndarray, level: int = 9) -> bytes:
    """uint8 quantisation, then each slice's 2D difference (x, then y; uint8 wrap-around), zlib'd.
    About 25 % smaller than zlib on the plain bytes for MRI; decoding is two cumulative sums."""
    q = quantise(images)
    d = q.copy()
    d[..., 1:] = q[..., 1:] - q[..., :-1]
    d[..., 1:, :] = d[..., 1:, :] - d[..., :-1, :]
    return zlib.compress(d.tobytes(), level)


def decode_images(blob: bytes, shape) -> np.ndarray:
    """The uint8 images of :func:`encode_images`."""
    d = np.frombuffer(zlib.decompress(blob), dtype=np.uint8).reshape(shape)
    return np.cumsum(np.cumsum(d, axis=-2, dtype=np.uint8), axis=-1, dtype=np.uint8)


def encode_case(folder: Path) -> tuple[bytes, dict]:
    """One cache case -> the bytes of its ``.npz`` and its pack record (meta and shapes)."""
    images = np.load(folder / IMAGES)
    brain = np.load(folder / BRAIN_MASK)
    seg = np.load(folder / SEG)
    arrays = {
        "images": np.frombuffer(encode_images(images), dtype=np.uint8),
        "brain_mask": np.frombuffer(zlib.compress(np.packbits(brain.astype(bool)).tobytes(), 9), dtype=np.uint8),
        "seg": np.frombuffer(zlib.compress(np.ascontiguousarray(seg, dtype=np.uint8).tobytes(), 9), dtype=np.uint8),
    }
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # already compressed: stored as is
    record = {"meta": json.loads((folder / META).read_text()), "images_shape": list(images.shape),
              "mask_shape": list(brain.shape)}
    return buf.getvalue(), record


def decode_case(npz_path: Path, record: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(images float16, brain_mask uint8, seg uint8)`` of a packed case, in the cache's shapes."""
    with np.load(npz_path) as z:
        q = decode_images(z["images"].tobytes(), record["images_shape"])
        shape = record["mask_shape"]
        bits = np.frombuffer(zlib.decompress(z["brain_mask"].tobytes()), dtype=np.uint8)
        brain = np.unpackbits(bits, count=int(np.prod(shape))).reshape(shape).astype(np.uint8)
        seg = np.frombuffer(zlib.decompress(z["seg"].tobytes()), dtype=np.uint8).reshape(shape).copy()
    return dequantise(q), brain, seg


# ------------------------------------------------------------------------------------------ sizes
def travelling_bytes(repo: Path, exclude: Path | None = None) -> int:
    """Bytes of what the device tool sends besides carried paths: git's tracked and untracked files
    that git does not ignore, and ``shared/`` if the checkout has one."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=repo,
                         check=True, capture_output=True).stdout.decode()
    files = {repo / p for p in out.split("\0") if p}
    shared = repo / "shared"
    if shared.is_dir():
        files |= {p for p in shared.rglob("*") if p.is_file()}
    if exclude is not None:
        files = {p for p in files if exclude not in p.parents}
    return sum(p.stat().st_size for p in files if p.is_file() and not p.is_symlink())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.exists() else 0


# ------------------------------------------------------------------------------------------ packages
def build_site(out: Path, wheel_dir: Path = WHEEL_CACHE) -> Path:
    """Download the packages' wheels (py3.12, manylinux x86-64 or pure Python), install them here into
    a scratch folder with ``pip --target`` and pack that folder as ``out/site.tar.xz`` (their test
    folders left out). Reused when the same wheels are already packed."""
    target = out / "site.tar.xz"
    stamp = out / "site.json"
    if target.exists() and stamp.exists() and json.loads(stamp.read_text()).get("packages") == list(PACKAGES):
        print(f"packages: {target} already holds {', '.join(PACKAGES)}")
        return target
    wheel_dir.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheel_dir),
                    *PACKAGES], check=True)
    wheels = []
    for spec in PACKAGES:
        name, version = spec.split("==")
        found = sorted(wheel_dir.glob(f"{name}-{version}-*.whl"))
        if not found:
            raise SystemExit(f"no wheel of {spec} in {wheel_dir}")
        wheels.append(found[-1])
    site = out / "_site"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), *map(str, wheels)], check=True)

    def keep(info: tarfile.TarInfo):
        parts = Path(info.name).parts
        return None if "tests" in parts or "__pycache__" in parts or parts[:1] == ("bin",) else info

    tmp = target.with_suffix(".tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for child in sorted(site.iterdir()):
            tar.add(child, arcname=child.name, filter=keep)
    tmp.replace(target)
    shutil.rmtree(site)
    stamp.write_text(json.dumps({"packages": list(PACKAGES), "wheels": [w.name for w in wheels]}, indent=2) + "\n")
    return target


# ------------------------------------------------------------------------------------------ pack
def candidates(cache: Path, phantom_datasets, splits) -> list[dict]:
    """Real-cohort cases of ``splits``, round-robin across datasets (cache order), each in name order."""
    index = read_index(cache)
    per_dataset = {}
    for entry in index["cases"]:
        if entry["dataset"] in phantom_datasets or entry["split"] not in splits:
            continue
        per_dataset.setdefault(entry["dataset"], []).append(entry)
    queues = [sorted(per_dataset[d], key=lambda e: e["case_id"]) for d in index["datasets"] if d in per_dataset]
    order = []
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def phantom_recipe(cache: Path, phantom_datasets, seed: int, cases: int | None) -> dict:
    """How the device regenerates the cache's phantom cohorts (``mmdiff phantom``'s arguments)."""
    index, info = read_index(cache), read_info(cache)
    cohorts = [d for d in index["datasets"] if d in phantom_datasets]
    counts = [sum(c["dataset"] == d for c in index["cases"]) for d in cohorts]
    spacing = info["config"]["spacing"]
    return {"cohorts": cohorts, "cases": int(cases if cases is not None else max(counts, default=0)),
            "seed": int(seed), "spacing": float(spacing[0] if isinstance(spacing, list) else spacing)}


def pack(cache: Path, out: Path, budget_mib: float | None = None, wheels: bool = True,
         phantom_datasets=PHANTOM_DATASETS, splits=("train",), phantom_seed: int = 0,
         phantom_cases: int | None = None, margin_mib: float = 2.0, repo: Path = REPO) -> dict:
    """Write the pack into ``out``; returns ``pack.json``'s record (with the sizes)."""
    cache, out = Path(os.path.expanduser(str(cache))), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    site_bytes = 0
    if wheels:
        site_bytes = build_site(out).stat().st_size
    else:
        for name in ("site.tar.xz", "site.json"):
            (out / name).unlink(missing_ok=True)
    tree = travelling_bytes(repo, exclude=out.resolve())
    if budget_mib is None:
        budget_mib = LIMIT_MIB - (tree + site_bytes) / MIB - margin_mib
    budget = int(budget_mib * MIB)
    cases_dir = out / "cases"
    shutil.rmtree(cases_dir, ignore_errors=True)
    cases_dir.mkdir()
    packed, used, skipped = [], 0, []
    for entry in candidates(cache, set(phantom_datasets), set(splits)):
        if budget - used < 256 * 1024:  # no case is that small: the rest are left out unread
            skipped.append(f"{entry['dataset']}/{entry['case_id']}")
            continue
        blob, record = encode_case(case_folder(cache, entry))
        if used + len(blob) > budget:
            skipped.append(f"{entry['dataset']}/{entry['case_id']}")
            continue
        name = f"{safe_name(entry['dataset'])}__{safe_name(entry['case_id'])}.npz"
        (cases_dir / name).write_bytes(blob)
        used += len(blob)
        packed.append({"dataset": entry["dataset"], "case_id": entry["case_id"], "split": entry["split"],
                       "file": f"cases/{name}", "bytes": len(blob),
                       "sha256": hashlib.sha256(blob).hexdigest()[:16], **record})
        print(f"  + {entry['dataset']}/{entry['case_id']}: {record['meta']['slices']} slices, "
              f"{len(blob) / MIB:.2f} MiB (total {used / MIB:.2f} of {budget / MIB:.2f} MiB)", flush=True)
    record = {
        "format": PACK_FORMAT, "codec": CODEC,
        "source_cache": str(cache),
        "cache_json": read_info(cache),
        "splits": json.loads((cache / SPLITS_JSON).read_text()),
        "phantoms": phantom_recipe(cache, set(phantom_datasets), phantom_seed, phantom_cases),
        "cases": packed,
        "sizes_mib": {"tree": round(tree / MIB, 2), "packages": round(site_bytes / MIB, 2),
                      "cases": round(used / MIB, 2), "budget": round(budget / MIB, 2),
                      "total": round((tree + site_bytes + used) / MIB, 2), "limit": LIMIT_MIB},
        "left_out": skipped,
    }
    (out / "pack.json").write_text(json.dumps(record) + "\n")
    return record


def summary(record: dict, out: Path) -> str:
    by = {}
    for c in record["cases"]:
        d = by.setdefault(c["dataset"], [0, 0, 0])
        d[0] += 1
        d[1] += c["meta"]["slices"]
        d[2] += c["bytes"]
    s = record["sizes_mib"]
    lines = [f"pack: {out}"]
    lines += [f"  {name}: {n} case(s), {sl} slices, {b / MIB:.2f} MiB" for name, (n, sl, b) in by.items()]
    ph = record["phantoms"]
    lines.append(f"  phantoms (made on the device): {', '.join(ph['cohorts'])} x {ph['cases']} cases, "
                 f"seed {ph['seed']}, {ph['spacing']} mm")
    lines.append(f"  sizes (MiB): tree {s['tree']} + packages {s['packages']} + cases {s['cases']} = {s['total']} "
                 f"of {s['limit']} (case budget {s['budget']})")
    if record["left_out"]:
        lines.append(f"  left out (budget): {len(record['left_out'])} case(s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="~/.cache/mmdiff/cpu-v2", help="prepared cache (default: %(default)s)")
    p.add_argument("--out", default=str(REPO / ".gpu"), help="pack folder (default: the repo's .gpu/)")
    p.add_argument("--budget-mib", type=float, help="MiB for the cases (default: what 64 MiB leaves, less a margin)")
    p.add_argument("--margin-mib", type=float, default=2.0, help="safety margin of the default budget")
    p.add_argument("--no-wheels", action="store_true", help="no packages (no network; tests)")
    p.add_argument("--phantom-datasets", nargs="+", default=list(PHANTOM_DATASETS),
                   help="datasets that are phantom cohorts, remade on the device (default: %(default)s)")
    p.add_argument("--phantom-cases", type=int, help="phantom cases per cohort (default: as many as the cache has)")
    p.add_argument("--phantom-seed", type=int, default=0)
    p.add_argument("--splits", nargs="+", default=["train"], help="splits of the real cases packed (default: train)")
    args = p.parse_args(argv)
    record = pack(Path(args.cache), Path(args.out), args.budget_mib, wheels=not args.no_wheels,
                  phantom_datasets=args.phantom_datasets, splits=args.splits, phantom_seed=args.phantom_seed,
                  phantom_cases=args.phantom_cases, margin_mib=args.margin_mib)
    print(summary(record, Path(args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
