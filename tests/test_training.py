"""Training end to end on the tiny configs: validation, checkpoints, exact resume, errors, 2-process DDP."""

import json
import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmdiff.data.cache import fingerprint, read_index
from mmdiff.export import publish_list
from mmdiff.models import MultiModalGenerator
from mmdiff.train import main as train_main
from mmdiff.training.stages import GANStage
from mmdiff.training.trainer import lr_factor


def _train(config, out, cache, *args):
    return train_main(["--config", config, "--output-dir", str(out), f"data.cache={cache}", "tracker=none", *args])


def test_gan_tiny_trains_validates_checkpoints_and_exports(tiny_cache, tmp_path):
    assert _train("gan-tiny", tmp_path / "run", tiny_cache, "--max-steps", "10", "validation.every=5") == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "val/psnr" in r]
    assert [r["step"] for r in validation] == [0, 5, 10]  # a baseline before the first step
    assert any(k.startswith("val/ssim_") for k in validation[-1])
    assert (run / "validation" / "step-0000005.png").stat().st_size > 1000
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-10"]
    assert {p.name for p in (run / "checkpoint-10").iterdir()} == {
        "generator.safetensors", "discriminators.safetensors", "state.pt", "checkpoint.json"}
    generator = MultiModalGenerator.from_pretrained(run / "final" / "generator")
    assert generator.config.dataset_names == ["glioma", "immune", "bratslike", "stroke"]
    text = (run / "final" / "training_info.json").read_text()
    info = json.loads(text)
    assert info["steps"] == 10 and info["validation"]["val/psnr"] == validation[-1]["val/psnr"]
    # the record identifies the data (names, case counts, fingerprint), not this machine's cache path
    assert str(tiny_cache) not in text and "cache" not in info and "cache" not in info["config"]["data"]
    index = read_index(tiny_cache)
    assert info["data"]["fingerprint"] == fingerprint(tiny_cache)
    assert list(info["data"]["datasets"]) == index["datasets"]
    for name, described in info["data"]["datasets"].items():
        cases = [c for c in index["cases"] if c["dataset"] == name]
        assert described["cases"] == len(cases) and described["id"] == index["datasets"].index(name)
        assert sum(described["splits"].values()) == len(cases)
    assert info["data"]["preparation"]["geometry"]["size"] == 64


def test_zero_steps_validates_the_initial_model(tiny_cache, tmp_path):
    assert _train("gan-tiny", tmp_path / "run", tiny_cache, "--max-steps", "0") == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0] and "val/psnr" in records[0]
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-0"]


def test_init_from_fine_tunes_matching_weights_and_starts_new_layers_fresh(tiny_cache, tmp_path, capsys):
    """``--init-from``: a new run starts from another run's weights, tensor by tensor where names and
    shapes match (here a wider output head is new), with a fresh schedule; the source is untouched."""
    assert _train("gan-tiny", tmp_path / "a", tiny_cache, "--max-steps", "2", "validation.every=0",
                  "model.refine_channels=0", "model.refine_blur=false", "model.detail_transfer=false") == 0
    source = load_file(tmp_path / "a" / "checkpoint-2" / "generator.safetensors")
    for start in (tmp_path / "a" / "checkpoint-2", tmp_path / "a" / "final"):  # a checkpoint, or an exported folder
        out = tmp_path / f"b-{start.name}"
        assert _train("gan-tiny", out, tiny_cache, "--max-steps", "0", "model.refine_channels=4",
                      "model.detail_transfer=false", "--init-from", str(start)) == 0
        started = load_file(out / "checkpoint-0" / "generator.safetensors")
        exported = load_file(tmp_path / "a" / "final" / "generator" / "diffusion_pytorch_model.safetensors")
        reference = source if start.name.startswith("checkpoint") else exported
        shared = [k for k in started if k in reference and started[k].shape == reference[k].shape]
        assert sorted(set(started) - set(shared)) == ["decoder.conv_out.bias", "decoder.conv_out.weight",
                                                      "decoder.refine.1.bias", "decoder.refine.1.weight"]
        for key in shared:
            torch.testing.assert_close(started[key], reference[key].float(), msg=key)
        assert "decoder.refine.1.weight" in started and "decoder.refine.1.weight" not in reference
        assert started["decoder.conv_out.weight"].shape != reference["decoder.conv_out.weight"].shape
        assert json.loads((out / "checkpoint-0" / "checkpoint.json").read_text())["step"] == 0
    assert _train("vae-tiny", tmp_path / "c", tiny_cache, "--max-steps", "0", "--init-from",
                  str(tmp_path / "a" / "checkpoint-2")) == 2
    assert "no weights there fit" in capsys.readouterr().err


def test_resume_equals_an_uninterrupted_run(tiny_cache, tmp_path):
    """Bit-exact, with the left-right flips and the sources' contrast changes too (functions of seed,
    epoch and index, and of seed and step)."""
    full = tmp_path / "full"
    assert _train("gan-tiny", full, tiny_cache, "--max-steps", "8", "checkpoint.every=4", "checkpoint.keep=null",
                  "validation.every=4", "data.flip=true", "train.source_gamma=[0.7,1.4]") == 0
    # a run that died after its checkpoint at step 4
    cut = tmp_path / "cut"
    shutil.copytree(full, cut)
    shutil.rmtree(cut / "checkpoint-8")
    shutil.rmtree(cut / "final")
    assert _train("gan-tiny", cut, tiny_cache, "--max-steps", "8", "checkpoint.every=4", "checkpoint.keep=null",
                  "validation.every=4", "data.flip=true", "train.source_gamma=[0.7,1.4]", "--resume", "latest") == 0
    assert yaml.safe_load((full / "config.yaml").read_text())["data"]["flip"] is True
    for name in ("generator", "discriminators"):
        a = load_file(full / "checkpoint-8" / f"{name}.safetensors")
        b = load_file(cut / "checkpoint-8" / f"{name}.safetensors")
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    state_a = torch.load(full / "checkpoint-8" / "state.pt", weights_only=True)
    state_b = torch.load(cut / "checkpoint-8" / "state.pt", weights_only=True)
    assert state_a["batches_done"] == state_b["batches_done"] == 8
    torch.testing.assert_close(state_a["ema"]["shadow_params"], state_b["ema"]["shadow_params"], rtol=0, atol=0)


class _Pids(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        return os.getpid()


def test_dataloader_workers_survive_the_ctrl_c_that_asks_for_a_graceful_stop(tiny_cache):
    """A terminal's Ctrl-C also reaches the DataLoader's workers: they ignore it, so the step the
    graceful stop finishes still gets its batch; the training loader installs that."""
    from mmdiff.training.data import ignore_interrupts, training_dataset, training_loader

    loader = torch.utils.data.DataLoader(_Pids(), batch_size=1, num_workers=1, worker_init_fn=ignore_interrupts)
    batches = iter(loader)
    worker = int(next(batches))
    assert worker != os.getpid()
    os.kill(worker, signal.SIGINT)
    assert [int(b) for b in batches] == [worker] * 3  # the same worker, alive, served the rest
    dataset = training_dataset({"modalities": None}, tiny_cache, seed=0)
    assert training_loader(dataset, batch_size=2, seed=0, num_workers=1)[0].worker_init_fn is ignore_interrupts
    assert training_loader(dataset, batch_size=2, seed=0)[0].worker_init_fn is None


def test_lesion_oversample_repeats_the_slices_with_a_lesion(tiny_cache):
    """``data.lesion_oversample: r``: each slice whose seg has a label comes r times per epoch."""
    from mmdiff.training.config import ConfigError
    from mmdiff.training.data import training_dataset, training_loader

    dataset = training_dataset({"modalities": None}, tiny_cache, seed=0)
    lesion = dataset.lesion_slices
    assert lesion.shape == (len(dataset),) and 0 < lesion.sum() < len(dataset)
    for i in (int(np.flatnonzero(lesion)[0]), int(np.flatnonzero(~lesion)[0])):
        assert bool((dataset[i]["seg"] > 0).any()) == lesion[i] or dataset.crop  # a crop may cut the lesion out
    counts = {}
    for r in (1, 3):
        _, sampler = training_loader(dataset, batch_size=2, seed=0, lesion_oversample=r)
        counts[r] = np.bincount([i for b in sampler for i in b], minlength=len(dataset))
    assert (counts[3][lesion] >= 3).all() and (counts[3][~lesion] <= 2).all()
    assert (counts[1] <= 2).all()
    with pytest.raises(ConfigError, match="lesion_oversample"):
        training_loader(dataset, batch_size=2, seed=0, lesion_oversample=0)


def test_dataset_oversample_repeats_one_datasets_slices_and_multiplies_with_lesions(tiny_cache):
    """``data.dataset_oversample: {name: n}``: each slice of that dataset comes n times per epoch (times
    the lesion repeats); the other datasets' slices are untouched; a name not in the cache is refused."""
    from mmdiff.training.config import ConfigError
    from mmdiff.training.data import training_dataset, training_loader

    dataset = training_dataset({"modalities": None}, tiny_cache, seed=0)
    names, ids, lesion = dataset.dataset_names, dataset.dataset_ids, dataset.lesion_slices
    present = [n for n in names if (ids == names.index(n)).any()]
    assert len(present) >= 2
    chosen = present[0]
    mine = ids == names.index(chosen)

    def counts(**kwargs):
        _, sampler = training_loader(dataset, batch_size=2, seed=0, **kwargs)
        return np.bincount([i for b in sampler for i in b], minlength=len(dataset))

    plain, more = counts(), counts(dataset_oversample={chosen: 4})
    assert (more[mine] >= 4).all() and (more[~mine] <= 2).all() and (plain <= 2).all()
    both = counts(dataset_oversample={chosen: 2}, lesion_oversample=3)
    assert (both[mine & lesion] >= 6).all() and (both[mine & ~lesion] >= 2).all()
    assert (both[~mine & lesion] >= 3).all() and (both[~mine & ~lesion] <= 2).all()
    with pytest.raises(ConfigError, match="not a training dataset"):
        training_loader(dataset, batch_size=2, seed=0, dataset_oversample={"nowhere": 2})
    with pytest.raises(ConfigError, match="whole number"):
        training_loader(dataset, batch_size=2, seed=0, dataset_oversample={chosen: 0.5})


def test_ctrl_c_saves_the_step_reached_and_resume_finishes_like_an_uninterrupted_run(tiny_cache, tmp_path,
                                                                                     monkeypatch, capsys):
    """Ctrl-C (or SIGTERM) mid-run: the loop stops at the step boundary with a checkpoint of that step
    (not the last periodic one), exports nothing, exits 130, and --resume latest ends bit-exact."""
    settings = ("--max-steps", "6", "checkpoint.every=4", "checkpoint.keep=null", "validation.every=0")
    before = signal.getsignal(signal.SIGINT)  # Python's handler; SIG_IGN in a background job without job control
    assert _train("gan-tiny", tmp_path / "full", tiny_cache, *settings) == 0
    original, calls = GANStage.training_step, []

    def step_then_interrupt(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # as if the user pressed Ctrl-C during the third step
            os.kill(os.getpid(), signal.SIGINT)
        return out

    monkeypatch.setattr(GANStage, "training_step", step_then_interrupt)
    run = tmp_path / "cut"
    assert _train("gan-tiny", run, tiny_cache, *settings) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 3" in err and "checkpoint-3" in err and "--resume latest" in err
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-3"] and not (run / "final").exists()
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored
    monkeypatch.setattr(GANStage, "training_step", original)
    assert _train("gan-tiny", run, tiny_cache, *settings, "--resume", "latest") == 0
    for name in ("generator", "discriminators"):
        a = load_file(tmp_path / "full" / "checkpoint-6" / f"{name}.safetensors")
        b = load_file(run / "checkpoint-6" / f"{name}.safetensors")
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_wall_time_budget_ends_training_and_exports(tiny_cache, tmp_path):
    # a budget already spent at the first step: training stops there, saves and exports as usual
    assert _train("gan-tiny", tmp_path / "run", tiny_cache, "--max-steps", "50", "--max-minutes", "1e-9") == 0
    info = json.loads((tmp_path / "run" / "final" / "training_info.json").read_text())
    assert info["steps"] == 1 and 0 <= info["train_minutes"] < 5
    assert [p.name for p in (tmp_path / "run").glob("checkpoint-*")] == ["checkpoint-1"]
    assert _train("gan-tiny", tmp_path / "bad", tiny_cache, "--max-minutes", "0") == 2  # a budget must be positive


def test_ldm_tiny_needs_no_other_step(tiny_cache, tmp_path):
    """From a fresh clone: trains its predictor (gan-tiny) first, then the residual UNet; exports a
    pipeline with the predictor as a component and a calibrated interval scale."""
    assert _train("ldm-tiny", tmp_path / "run", tiny_cache, "--max-steps", "4", "model.predictor.max_steps=3",
                  "validation.every=0") == 0
    final = tmp_path / "run" / "final"
    assert {p.name for p in final.iterdir()} >= {"unet", "vae", "scheduler", "predictor", "error_model",
                                                  "training_info.json"}
    index = json.loads((final / "model_index.json").read_text())
    assert index["vae"] == ["mmdiff.models.wavelet", "HaarWavelet"]
    assert index["error_model"] == ["mmdiff.models.error_scale", "ErrorScaleNet"]  # trained beside the UNet
    records_ = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(np.isfinite(r.get("train/error_nll", np.nan)) for r in records_)
    assert index["predictor"] == ["mmdiff.models.gan", "MultiModalGenerator"]
    assert index["scheduler"] == ["diffusers", "DPMSolverMultistepScheduler"]  # the config's sampler, as given
    assert index["coverage"] == 0.9 and index["interval_scale"] > 0 and index["calibration_samples"] == 2
    assert set(index["residual_fit"]) == {"cross", "signal", "noise"}  # the point estimate's residual weight
    predictor = json.loads((final / "predictor" / "config.json").read_text())
    assert predictor["_name_or_path"].endswith("predictor-stage/final/generator")
    info = json.loads((final / "training_info.json").read_text())
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final_validation = [r for r in records if "val/psnr" in r][-1]
    # the record is the validation that ran on the final model: sequences scored, each finite and plausible
    assert {k: v for k, v in final_validation.items() if k.startswith("val/")} == info["validation"]
    scored = [k for k in info["validation"] if k.startswith("val/psnr_")]
    assert len(scored) >= 3 and {k.removeprefix("val/psnr_") for k in scored} <= set(info["modalities"])
    assert all(5 < info["validation"][k] < 60 for k in scored + ["val/psnr"])

    # `mmdiff calibrate` refits both on a cache's validation cases into a new folder, never the input
    from mmdiff.cli import main as cli

    before = (final / "model_index.json").read_text()
    out = tmp_path / "calibrated"
    assert cli(["calibrate", str(final), "--data", str(tiny_cache), "--out", str(out), "--samples", "3",
                "--steps", "2", "--coverage", "0.8", "--slices-per-case", "1"]) == 0
    assert (final / "model_index.json").read_text() == before
    record = json.loads((out / "calibration.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    assert index["coverage"] == 0.8 and index["calibration_samples"] == 3
    assert index["uncertainty_window"] == record["uncertainty_window"] == 5  # the scale holds for the pooled spread
    assert index["interval_scale"] == record["interval_scale"] > 0 and index["residual_fit"] == record["residual_fit"]
    assert index["interval_scales"] == record["interval_scales"] and all(v > 0 for v in record["interval_scales"].values())
    # the weight is least squares over [0, 1] (0 is the predictor alone): never worse than the predictor there
    assert record["voxels"] > 0 and record["point_mse"] <= record["predictor_mse"] + 1e-12
    assert set(record["residual_weight"]) == {"1", "2", "4", "8"}
    assert (out / "training_info.json").is_file() and not (out / "README.md").exists()  # the old card's numbers
    assert cli(["export", str(out), str(tmp_path / "published")]) == 0  # a card for the calibrated pipeline
    assert (tmp_path / "published" / "calibration.json").read_text() == (out / "calibration.json").read_text()
    assert "calibration.json" in publish_list(tmp_path / "published")[0]
    assert cli(["calibrate", str(final), "--data", str(tiny_cache), "--out", str(final), "--overwrite"]) == 2
    assert cli(["calibrate", str(final), "--data", str(tiny_cache), "--out", str(out)]) == 2  # exists
    assert record["conditions"] == "random"  # the default
    assert record["error_model"] is True and -1 <= record["spearman_calibration"] <= 1
    assert cli(["calibrate", str(final), "--data", str(tiny_cache), "--out", str(tmp_path / "rich"), "--samples", "2",
                "--steps", "2", "--slices-per-case", "1", "--conditions", "all-but-one"]) == 0
    assert json.loads((tmp_path / "rich" / "calibration.json").read_text())["conditions"] == "all-but-one"


def test_calibration_conditions_all_but_one_or_random_subsets():
    """all-but-one: one target per slice, every other sequence a source; random: any non-empty proper
    subset as sources and the rest as targets, reproducible from the seed; fewer sources than
    all-but-one on some slices."""
    from mmdiff.training.data import calibration_slices

    available = torch.tensor([True, True, True, True, False, False, False])
    samples = [{"images": torch.zeros(7, 4, 4), "available": available, "dataset_id": 0,
                "brain_mask": torch.ones(4, 4, dtype=torch.bool)} for _ in range(40)]
    modalities = ("t1", "t2", "t1c", "flair", "dwi", "adc", "pd")
    rich = calibration_slices(samples, lambda i: i, conditions="all-but-one")
    assert all(int(t.sum()) == 1 and bool((s | t).eq(available).all()) for _, s, t, *_ in rich)
    drawn = calibration_slices(samples, lambda i: i, conditions="random", seed=3, modalities=modalities)
    counts = set()
    for _, sources, targets, *_ in drawn:
        sources, targets = torch.as_tensor(sources).bool(), torch.as_tensor(targets).bool()
        assert 1 <= int(sources.sum()) <= 3 and not bool((sources & targets).any())
        assert bool((sources | targets).eq(available).all())
        counts.add(int(sources.sum()))
    assert counts == {1, 2, 3}
    again = calibration_slices(samples, lambda i: i, conditions="random", seed=3, modalities=modalities)
    assert all(torch.equal(torch.as_tensor(a[1]), torch.as_tensor(b[1])) for a, b in zip(drawn, again))
    with pytest.raises(ValueError, match="need the modality names"):
        calibration_slices(samples, lambda i: i, conditions="random")


def test_config_errors_before_training(tiny_cache, tmp_path, capsys):
    refused = [  # (config, override, what the one-line error says)
        ("gan-tiny", "data.modalities=[t1,pd]", "modalities ['pd'] are not in this cache"),
        ("gan-tiny", "data.datasets=[isles]", "datasets ['isles'] are not in this cache"),
        ("gan-tiny", "train.lr=1", "unknown config key 'train.lr'"),
        ("gan-tiny", "train.source_gamma=[1.4,0.7]", "needs 0 < low <= high"),
        ("ldm-tiny", "train.source_gamma=[0.7,1.4]", "train.source_gamma is for the gan stage"),
        ("gan-tiny", "train.dataset_dropout_from=[glioma,isles]",
         "train.dataset_dropout_from names ['isles'], not datasets of this run"),
        ("gan-tiny", "train.dataset_dropout_from=glioma", "must be null or a list of dataset names"),
        ("gan-tiny", "model.lambdas={lambda_syn: 100, lambda_ssm: 20}",
         "model.lambdas has lambda_ssm: the GAN's loss weights are lambda_syn, lambda_rec, lambda_adv, lambda_ssim"),
    ]
    for i, (config, override, message) in enumerate(refused):
        assert _train(config, tmp_path / str(i), tiny_cache, override) == 2, override
        assert message in capsys.readouterr().err
    assert train_main(["--config", "no-such-config"]) == 2
    assert "no config 'no-such-config'" in capsys.readouterr().err
    assert not any(tmp_path.glob("*/checkpoint-*"))


def test_gradient_accumulation_and_bf16_autocast(tiny_cache, tmp_path):
    # a process of its own: accelerate's state (mixed precision included) is fixed once per process
    cmd = [sys.executable, "-m", "mmdiff.train", "--config", "gan-tiny", "--output-dir", str(tmp_path / "run"),
           "--max-steps", "3", f"data.cache={tiny_cache}", "tracker=none", "validation.every=0",
           "train.gradient_accumulation_steps=2", "train.mixed_precision=bf16"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    state = torch.load(tmp_path / "run" / "checkpoint-3" / "state.pt", weights_only=True)
    assert state["step"] == 3 and state["batches_done"] == 6  # two micro-batches per optimizer step


def test_lr_schedule_constant_then_linear_to_zero():
    factor = lr_factor(total_steps=200, decay_start=0.25)  # the paper: 50 of 200 epochs constant
    assert factor(0) == factor(49) == 1.0
    assert factor(125) == pytest.approx(0.5) and factor(200) == 0.0
    assert lr_factor(100, 0.5, warmup_steps=10)(4) == pytest.approx(0.5)


@pytest.mark.slow
def test_two_process_ddp_on_cpu_keeps_ranks_identical(tiny_cache, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "-m", "mmdiff.train", "--config", "gan-tiny", "--output-dir", str(tmp_path / "ddp"),
           "--max-steps", "6", f"data.cache={tiny_cache}", "tracker=none", "validation.every=0"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "ddp" / "final" / "training_info.json").read_text())
    assert info["processes"] == 2
    assert len(info["rank_checksums"]) == 2 and info["rank_checksums"][0] == info["rank_checksums"][1]
