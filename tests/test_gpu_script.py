"""bench/gpu (issue 11's lent-GPU script) on a CPU with a tiny setting: pack -> run.sh (unpack, phantoms,
2 training steps, export) -> an $OUT-like folder. The tiny phantom cache's glioma cohort stands in
for a real one; no network (no packages are packed)."""

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench" / "gpu"))

import pack as gpu_pack  # noqa: E402

from mmdiff.data.cache import BRAIN_MASK, IMAGES, META, SEG, case_folder, read_index, read_info  # noqa: E402

REAL = "glioma"  # the tiny cache's cohort that plays a real one
PHANTOMS = ["immune", "bratslike", "stroke"]


def test_codec_round_trip_is_uint8_quantisation():
    rng = np.random.default_rng(0)
    images = rng.random((3, 2, 16, 20)).astype(np.float16)
    images[:, :, :3] = 0
    q = gpu_pack.decode_images(gpu_pack.encode_images(images), images.shape)
    assert np.array_equal(q, gpu_pack.quantise(images))
    assert np.abs(gpu_pack.dequantise(q).astype(np.float32) - images.astype(np.float32)).max() <= 1 / 510 + 1e-3


def test_budget_counts_what_travels(tmp_path):
    tree = gpu_pack.travelling_bytes(REPO)
    # the data travels in what the tree leaves of the 64 MiB: keep a third of it free (docs/evaluation/README.md)
    assert 0 < tree < (64 - 20) * 2**20, f"the working tree is {tree / 2**20:.1f} MiB: too little left for the data"
    assert gpu_pack.travelling_bytes(REPO, exclude=REPO / "bench") < tree


@pytest.mark.slow
def test_pack_unpack_train_export(tiny_cache, tmp_path):
    started = time.monotonic()
    pack_dir, out, work = tmp_path / "pack", tmp_path / "out", tmp_path / "work"
    # the held-out case too (the tiny cohorts have no val case): the run validates on it
    record = gpu_pack.pack(tiny_cache, pack_dir, wheels=False, phantom_datasets=PHANTOMS, phantom_cases=1,
                           splits=("train", "test"))
    assert record["cases"] and {c["dataset"] for c in record["cases"]} == {REAL}
    assert {c["split"] for c in record["cases"]} == {"train", "test"}
    assert record["phantoms"] == {"cohorts": PHANTOMS, "cases": 1, "seed": 0, "spacing": 3.0}
    assert record["sizes_mib"]["total"] <= 64 - 2  # the default budget keeps its margin
    assert not (pack_dir / "site.tar.xz").exists()
    # a budget that holds one case packs one
    small = gpu_pack.pack(tiny_cache, tmp_path / "small", budget_mib=record["cases"][0]["bytes"] / 2**20 + 0.01,
                          wheels=False, phantom_datasets=PHANTOMS)
    assert len(small["cases"]) == 1 and small["left_out"]

    # one phantom cohort is enough to test their remaking (and saves half a minute on a CPU)
    record["phantoms"]["cohorts"] = PHANTOMS[-1:]
    (pack_dir / "pack.json").write_text(json.dumps(record))
    env = {**os.environ, "OUT": str(out), "PACK": str(pack_dir), "WORK": str(work), "CONFIG": "gan-tiny",
           "STEPS": "2", "WORKERS": "1", "PYTHON": sys.executable, "TOTAL_MIN": "5", "RESERVE_MIN": "1",
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run(["bash", str(REPO / "bench" / "gpu" / "run.sh"), "tracker=none", "validation.every=0"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # the rebuilt cache: the source's dataset ids and splits; packed cases equal up to uint8 quantisation
    cache = work / "cache"
    assert read_info(cache)["datasets"] == read_info(tiny_cache)["datasets"]
    index, source = read_index(cache), read_index(tiny_cache)
    by_key = {(c["dataset"], c["case_id"]): c for c in source["cases"]}
    got = {(c["dataset"], c["case_id"]): c for c in index["cases"]}
    packed = {(c["dataset"], c["case_id"]) for c in record["cases"]}
    remade = {k for k in got if k[0] in PHANTOMS}
    assert set(got) == packed | remade and remade <= set(by_key) and len(remade) == 1
    for key in packed:
        a, b = got[key], by_key[key]
        assert {k: a[k] for k in ("dataset_id", "modalities", "slices", "split", "has_seg")} == \
               {k: b[k] for k in ("dataset_id", "modalities", "slices", "split", "has_seg")}
        new, old = case_folder(cache, a), case_folder(tiny_cache, b)
        x, y = np.load(new / IMAGES), np.load(old / IMAGES)
        assert x.dtype == y.dtype == np.float16 and x.shape == y.shape
        assert np.abs(x.astype(np.float32) - y.astype(np.float32)).max() <= 1 / 510 + 1e-3
        assert np.array_equal(np.load(new / BRAIN_MASK), np.load(old / BRAIN_MASK))
        assert np.array_equal(np.load(new / SEG), np.load(old / SEG))
        assert json.loads((new / META).read_text()) == json.loads((old / META).read_text())
    # phantoms remade on the "device" are the same cases, in the same splits
    for key, entry in got.items():
        if key[0] in PHANTOMS:
            assert entry["split"] == by_key[key]["split"] and entry["slices"] == by_key[key]["slices"]

    # $OUT: at most 8 plain files, each under 16 MiB, with the exported fp16 pipeline inside the tarball
    files = sorted(p.name for p in out.iterdir())
    assert {"log.txt", "metrics.jsonl", "training_info.json", "mmdiff-gan-gpu.tar.gz"} <= set(files), files
    assert any(f.startswith("validation-step-") and f.endswith(".png") for f in files), files
    assert len(files) <= 8 and all((out / f).is_file() and (out / f).stat().st_size < 16 * 2**20 for f in files)
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 2 and REAL in info["data"]["datasets"]
    with tarfile.open(out / "mmdiff-gan-gpu.tar.gz") as tar:
        tar.extractall(tmp_path / "pipe", filter="data")
    pipe = tmp_path / "pipe" / "mmdiff-gan-gpu"
    assert (pipe / "model_index.json").exists() and (pipe / "README.md").exists()
    assert json.loads((pipe / "training_info.json").read_text())["exported_dtype"] == "float16"
    from safetensors.torch import load_file

    weights = load_file(next(pipe.rglob("*.safetensors")))
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {__import__("torch").float16}
    log = (out / "log.txt").read_text()
    assert "unpacked" in log and "done in" in log
    print(f"gpu script test: {time.monotonic() - started:.1f} s")
    shutil.rmtree(work)
