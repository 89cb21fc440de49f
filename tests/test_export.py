"""`mmdiff export` (run -> pipeline folder + model card) and `mmdiff push` against a local stand-in hub."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file

from mmdiff.cli import main
from mmdiff.data.cache import fingerprint, read_index
from mmdiff.pipelines import MMGANPipeline
from test_pipelines import tiny_gan, tiny_ldm

HERE = Path(__file__).parent


def described(name: str, cases: int, modalities: dict) -> dict:
    return {"id": 0, "cases": cases, "splits": {"train": cases - 2, "val": 1, "test": 1}, "slices": 40 * cases,
            "modalities": modalities, "labelled": 0}


DATA = {"fingerprint": "0123456789abcdef",
        "preparation": {"clip_percentile": 99.0, "geometry": {"spacing": [1.5, 1.5, 1.5], "size": 160}},
        "datasets": {"brats": described("brats", 7, {"t1": 7, "t2": 7, "t1c": 7, "flair": 7}),
                     "ixi": described("ixi", 5, {"t1": 5, "t2": 5})}}


def fake_run(root: Path, pipe, **info) -> Path:
    """A finished training run folder as the trainer leaves it."""
    pipe.save_pretrained(root / "final")
    info = {"stage": "gan", "steps": 10, "datasets": ["brats", "ixi"], "modalities": pipe.modalities,
            "data": DATA, "processes": 1, "device": "cpu", "train_minutes": 3.5,
            "config": {"stage": "gan", "train": {"batch_size": 4, "learning_rate": 2e-4, "ema_decay": 0.99}}} | info
    (root / "final" / "training_info.json").write_text(json.dumps(info))
    return root


def test_card_facts_come_from_the_run(tmp_path):
    from mmdiff.data.preprocessing import MRIPreprocessor

    out = tmp_path / "mmdiff-gan"
    pipe = tiny_gan()
    pipe.register_modules(preprocessor=MRIPreprocessor("percentile", clip_percentile=99.0))  # the model's own rule
    assert main(["export", str(fake_run(tmp_path / "run", pipe)), str(out)]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.datasets == ["brats", "ixi"]
    text = card.text
    for fact in ("`brats`: 7 cases (5 train, 1 validation, 1 test)", "`ixi`: 5 cases", "0123456789abcdef",
                 "clipped at the 99th percentile", "1.5 x 1.5 x 1.5 mm and a 160 x 160", "about 1.5 mm in plane",
                 "Trained for 10 steps (3.5 minutes) on 1 cpu process(es)", "8 training cases from 2 dataset(s)",
                 "ixi: t1, t2", "--dataset brats", "import mmdiff  #", "Menze et al."):
        assert fact in text, fact
    for claim in ("12 real BraTS", "two CPU cores", "99.5th", "phantom cohort", "--engine", "random powers"):
        assert claim not in text, claim
    # a training setting the run used is stated; one it did not use is not (above)
    config = {"stage": "gan", "train": {"batch_size": 4, "learning_rate": 2e-4, "ema_decay": 0.99,
                                        "dataset_dropout": 0.3, "source_gamma": [0.7, 1.4],
                                        "dataset_dropout_from": ["brats"]}}
    assert main(["export", str(fake_run(tmp_path / "run3", tiny_gan(), config=config)), str(tmp_path / "g")]) == 0
    text = ModelCard.load(tmp_path / "g" / "README.md").text
    assert "dataset dropout 0.3 (of brats only), sources raised to random powers in [0.7, 1.4]" in text
    # none of our claims for a run on other data: no BraTS citation, no dataset option invented
    other = tmp_path / "other"
    data = {**DATA, "datasets": {"site-a": described("site-a", 4, {"t1": 4})}}
    assert main(["export", str(fake_run(tmp_path / "run2", tiny_gan(), datasets=[], data=data)), str(other)]) == 0
    text = ModelCard.load(other / "README.md").text
    assert "`site-a`: 4 cases" in text and "Menze" not in text and "--dataset brats" not in text
    assert "ICBM152" not in text  # no phantoms in this run


def test_export_replaces_a_recorded_cache_path_by_what_identifies_the_data(tmp_cache_run):
    run, cache, out = tmp_cache_run
    assert main(["export", str(run), str(out)]) == 0
    text = (out / "training_info.json").read_text()
    info = json.loads(text)
    assert str(cache) not in text and "cache" not in info
    assert info["data"]["fingerprint"] == fingerprint(cache)
    assert set(info["data"]["datasets"]) == set(read_index(cache)["datasets"])


@pytest.fixture
def tmp_cache_run(tiny_cache, tmp_path):
    """A run recorded the old way, with the absolute path of its cache."""
    run = fake_run(tmp_path / "run", tiny_gan(), data=None, cache=str(tiny_cache))
    return run, tiny_cache, tmp_path / "out"


def fake_evaluation(root: Path, method: str) -> Path:
    root.mkdir(parents=True)
    columns = ["dataset", "case", "split", "task", "method", "psnr_brain", "ssim_brain", "mae_brain", "psnr_whole",
               "ssim_whole", "mae_whole", "psnr_lesion", "ssim_lesion", "mae_lesion"]
    with open(root / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for case, value in (("a", 20.0), ("b", 22.0)):
            for name, offset in ((method, 0.0), ("copy-nearest", -5.0)):
                writer.writerow(["brats", case, "test", "t1+t2+flair->t1c", name, value + offset, 0.7, 0.05, 30, 0.9,
                                 0.02, "nan", "nan", "nan"])
    return root


def test_export_writes_fp16_weights_and_a_card_with_held_out_results(tmp_path):
    pipe = tiny_gan()
    run = fake_run(tmp_path / "run", pipe)
    evaluation = fake_evaluation(tmp_path / "eval", "mmdiff-gan")
    out = tmp_path / "pipelines" / "mmdiff-gan"
    assert main(["export", str(run), str(out), "--evaluation", str(evaluation)]) == 0
    weights = load_file(out / "generator" / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float16}
    loaded = MMGANPipeline.from_pretrained(out)
    assert loaded.generator.dtype == torch.float32  # diffusers loads fp16 files into float32 models
    for name, value in loaded.generator.state_dict().items():
        torch.testing.assert_close(value, pipe.generator.state_dict()[name].half().float(), rtol=0, atol=0)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "image-to-image"
    assert "mri" in card.data.tags and card.data.license == "apache-2.0"
    results = {(r.dataset_config, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert results == {("t1+t2+flair->t1c", "psnr"): 21.0, ("t1+t2+flair->t1c", "ssim"): 0.7}
    assert "not for diagnosis" in card.text and "copy-nearest" in card.text and "MMGANPipeline" in card.text
    assert "`--flip-average` (`flip_average=True`)" in card.text  # the GAN's option, under "Use"
    assert json.loads((out / "training_info.json").read_text())["exported_dtype"] == "float16"
    # no path of this machine in what is published: configs name the model, not the folder it came from
    for path in out.rglob("*.json"):
        assert str(tmp_path) not in path.read_text(), path
    assert json.loads((out / "model_index.json").read_text())["_name_or_path"] == "mmdiff-gan"
    assert json.loads((out / "generator" / "config.json").read_text())["_name_or_path"] == "mmdiff-gan/generator"
    # nothing replaced without --overwrite; an evaluation without this model is an error
    assert main(["export", str(run), str(out)]) == 2
    assert main(["export", str(run), str(tmp_path / "other"), "--evaluation", str(evaluation),
                 "--method", "mmdiff-ldm"]) == 2
    assert not (tmp_path / "other").exists()


def test_export_card_quotes_the_downstream_dice_of_this_model(tmp_path):
    run = fake_run(tmp_path / "run", tiny_gan())
    downstream = tmp_path / "downstream"
    downstream.mkdir()
    (downstream / "dice.json").write_text(json.dumps({"replace": "t1c", "method": "mmdiff-gan", "rows": []}))
    (downstream / "dice.md").write_text("| condition | WT | TC | ET |\n|---|---|---|---|\n| all real | 0.8 | 0.8 | 0.7 |\n")
    out = tmp_path / "mmdiff-gan"
    assert main(["export", str(run), str(out), "--downstream", str(downstream)]) == 0
    card = ModelCard.load(out / "README.md").text
    assert "### Downstream" in card and "| all real | 0.8 | 0.8 | 0.7 |" in card
    # another model's downstream scores, or a folder without them, are refused
    assert main(["export", str(run), str(tmp_path / "other"), "--downstream", str(downstream)]) == 2
    assert main(["export", str(run), str(tmp_path / "none"), "--downstream", str(tmp_path)]) == 2
    assert not (tmp_path / "other").exists() and not (tmp_path / "none").exists()


def test_export_ldm_without_evaluation_says_so(tmp_path):
    run = fake_run(tmp_path / "run", tiny_ldm())
    out = tmp_path / "ldm"
    assert main(["export", str(run), str(out), "--dtype", "float32", "--repo-id", "org/tiny-ldm"]) == 0
    card = ModelCard.load(out / "README.md")
    assert card.data.eval_results is None and "Not evaluated yet" in card.text
    assert "flip_average" not in card.text  # the diffusion engine refuses it
    assert 'DiffusionPipeline.from_pretrained("org/tiny-ldm")' in card.text
    assert {t.dtype for t in load_file(out / "unet" / "diffusion_pytorch_model.safetensors").values()} == {torch.float32}


@pytest.fixture
def hub(tmp_path):
    """The stand-in hub server on a free local port: (endpoint, folder its repos are written to)."""
    root, port_file = tmp_path / "hub", tmp_path / "port"
    root.mkdir()
    server = subprocess.Popen([sys.executable, str(HERE / "hub_server.py"), str(root), str(port_file)])
    try:
        for _ in range(100):
            if port_file.exists() and port_file.read_text():
                break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port_file.read_text()}", root
    finally:
        server.terminate()
        server.wait()


def test_push_uploads_the_folder(hub, tmp_path):
    endpoint, root = hub
    run = fake_run(tmp_path / "run", tiny_gan())
    out = tmp_path / "mmdiff-gan"
    assert main(["export", str(run), str(out)]) == 0
    # huggingface_hub reads HF_ENDPOINT at import: push from a fresh process, online against the stand-in
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"} | {"HF_ENDPOINT": endpoint,
                                                                            "HF_TOKEN": "hf_stand_in"}
    done = subprocess.run([sys.executable, "-m", "mmdiff.cli", "push", str(out), "--repo-id", "org/mmdiff-gan"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pushed" in done.stdout
    uploaded = root / "org" / "mmdiff-gan"
    for file in ("model_index.json", "README.md", "generator/config.json",
                 "generator/diffusion_pytorch_model.safetensors"):
        assert (uploaded / file).read_bytes() == (out / file).read_bytes()


def test_push_refuses_a_folder_that_is_not_an_export(tmp_path, capsys):
    tiny_gan().save_pretrained(tmp_path / "bare")
    assert main(["push", str(tmp_path / "bare"), "--repo-id", "org/x"]) == 2
    assert "no README.md model card" in capsys.readouterr().err


def test_push_offline_says_what_to_do(tmp_path, capsys):
    run = fake_run(tmp_path / "run", tiny_gan())
    assert main(["export", str(run), str(tmp_path / "out")]) == 0
    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # the test command sets it
    assert main(["push", str(tmp_path / "out"), "--repo-id", "org/x"]) == 2
    assert "unset it to push" in capsys.readouterr().err


def test_the_card_describes_the_generator_layout_from_its_config():
    from mmdiff.export import generator_layout

    lean = {"modality_streams": False, "shared_decoder": True, "patch_size": 2, "refine_blur": True,
            "context_slices": 1, "detail_transfer": True}
    text = generator_layout(lean)
    assert "lean layout" in text and "2 x 2 patches" in text and "neighbouring slice on each side" in text
    assert "fine detail" in text
    assert "fine detail" not in generator_layout({**lean, "detail_transfer": False})
    assert "coarser" not in text and "1 coarser à trous band)" in generator_layout({**lean, "detail_bands": 2})
    assert "whole source" not in text and "low-pass below them: the whole source)" in generator_layout(
        {**lean, "detail_base": True})
    assert "full-resolution head" not in text
    assert "16-channel full-resolution head" in generator_layout({**lean, "fine_channels": 16})
    assert generator_layout({"modality_streams": True, "patch_size": 1, "context_slices": 0}) == ""
