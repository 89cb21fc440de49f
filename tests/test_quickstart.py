"""`mmdiff quickstart`: hidden sequences of a phantom exam, synthesised by both engines, scored, pictured."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from mmdiff.io import is_synthetic, load_volume
from mmdiff.quickstart import quickstart
from test_pipelines import tiny_gan, tiny_ldm


def test_quickstart_hides_synthesises_scores_and_pictures(tmp_path):
    out = tmp_path / "qs"
    ldm = tiny_ldm()
    result = quickstart(out, hide=["t1ce", "flair"], pipelines={"gan": tiny_gan(), "ldm": ldm}, steps=2,
                        spacing=3.0, progress=False)
    phantom_t1 = next((out / "phantom").rglob("*-t1n.nii.gz"))
    # the diffusion engine runs at the pipeline's default sample count: with K > 1 it also maps the uncertainty
    assert ldm.default_num_samples > 1
    assert set(result["files"]["ldm"]) == {"t1c", "flair", "t1c_uncertainty", "flair_uncertainty"}
    for engine in ("gan", "ldm"):
        assert {"t1c", "flair"} <= set(result["files"][engine])
    assert set(result["files"]["gan"]) == {"t1c", "flair"}
    for engine in ("gan", "ldm"):
        image = load_volume(result["files"][engine]["t1c"])
        assert is_synthetic(result["files"][engine]["t1c"])
        assert image.data.shape == load_volume(phantom_t1).data.shape
        assert np.isfinite(image.data).all() and image.data.max() > 0
    table = result["metrics"].read_text()
    assert table.count("| gan |") == 2 and table.count("| ldm |") == 2 and "Normalisation" in table
    assert set(result["scores"]) == {(e, t) for e in ("gan", "ldm") for t in ("t1c", "flair")}
    assert result["montage"].stat().st_size > 10_000
    # per hidden sequence: real, then each engine's image and |error|, and the diffusion engine's uncertainty
    gan_only = quickstart(tmp_path / "gan", hide=["t1ce", "flair"], pipelines={"gan": tiny_gan()}, engines=["gan"],
                          spacing=3.0, progress=False)
    widths = [Image.open(r["montage"]).width for r in (gan_only, result)]
    # the widest row: 4 inputs alone (gan), 1 + 2 + 3 = 6 panels with the ldm's uncertainty (5 without it)
    assert widths[1] - widths[0] == (6 - 4) * (192 + 4)
    with pytest.raises(FileExistsError):
        quickstart(out, hide=["t1c"], pipelines={"gan": tiny_gan()}, engines=["gan"], spacing=3.0, progress=False)


def test_quickstart_refuses_to_hide_everything_or_unknown(tmp_path):
    with pytest.raises(ValueError, match="something must stay"):
        quickstart(tmp_path / "a", hide=["t1", "t2", "t1c", "flair", "dwi", "adc"], engines=[])
    with pytest.raises(ValueError, match="unknown modality 'pd': known modalities are t1, t2"):
        quickstart(tmp_path / "b", hide=["pd"], engines=[])


def test_quickstart_case_is_one_the_models_held_out(tmp_path):
    """The case comes from the models' training records (``data.datasets.glioma.held_out``); the
    published pipelines name PhantomGLI-00005-000, which their training split never saw."""
    import json

    from mmdiff.quickstart import held_out_case
    from mmdiff.resources import published_pipeline

    def record(folder, test, val=()):
        folder.mkdir(parents=True)
        data = {"datasets": {"glioma": {"held_out": {"test": list(test), "val": list(val)}}}}
        (folder / "training_info.json").write_text(json.dumps({"data": data}))
        return folder

    a = record(tmp_path / "a", ["PhantomGLI-00005-000"], ["PhantomGLI-00002-000"])
    b = record(tmp_path / "b", ["PhantomGLI-00002-000"])
    assert held_out_case([a]) == 4
    assert held_out_case([a, b]) == 1  # the one case both held out
    assert held_out_case([a, tmp_path / "none"]) is None  # a model that does not say
    assert held_out_case([published_pipeline(e) for e in ("gan", "ldm")]) == 4
    # the tiny test pipelines record nothing: the first case, and the table says it may have been seen
    result = quickstart(tmp_path / "qs", hide=["t1c"], pipelines={"gan": tiny_gan()}, engines=["gan"],
                        spacing=3.0, progress=False)
    assert result["case"] == "PhantomGLI-00001-000" and "may have trained on it" in result["metrics"].read_text()
