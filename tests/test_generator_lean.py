"""The lean, 2.5D generator layout (one U-Net over patches, neighbouring slices as input) and the
lesion-weighted L1: what the published one-step engine is built from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mmdiff.data.dataset import SliceDataset
from mmdiff.losses import lesion_pixel_weight, selective_l1
from mmdiff.models import MultiModalGenerator
from mmdiff.training.config import ConfigError
from mmdiff.training.stages import lesion_weight_config, target_weight_config
from mmdiff.pipelines import MMGANPipeline
from test_models import FLAIR, M, T1, T1C, T2, images, mask, perturb_modulations

LEAN = dict(modality_streams=False, shared_decoder=True, context_slices=1, patch_size=2)


def lean_generator(**kwargs) -> MultiModalGenerator:
    torch.manual_seed(0)
    settings = dict(num_datasets=2, block_out_channels=(8, 16), embedding_dim=16, norm_num_groups=4) | LEAN
    return MultiModalGenerator(**(settings | kwargs))



class StepAccelerator:
    """Enough of ``accelerate.Accelerator`` for a stage's ``training_step`` on one process."""

    sync_gradients = False
    process_index = 0

    def accumulate(self, *models):
        import contextlib
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

def test_lean_layout_has_one_tower_and_runs_on_multiples_of_its_patch_and_levels():
    model = lean_generator()
    assert model.size_multiple == 4
    assert not hasattr(model, "modality_encoders") and not hasattr(model, "modality_decoders")
    out = model(images(size=12), mask(T1, T2), 0)
    assert out.shape == (2, M, 12, 12) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="divisible by 4"):
        model(images(size=14), mask(T1), 0)
    pmm = MultiModalGenerator(num_datasets=2, block_out_channels=(8, 16), embedding_dim=16, norm_num_groups=4)

    def flops(network):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network(images(size=32), mask(T1, T2), 0)
        return counter.get_total_flops()

    assert flops(model) < flops(pmm) / 4


def test_refine_layer_draws_each_pixel_from_all_positions_of_its_patch():
    """Without ``refine_channels`` each of a 2 x 2 patch's pixels has its own output weights (the
    checkerboard: silence one and every pixel at that position goes flat); with it a 3 x 3 conv at
    full resolution draws every pixel from features of all four positions."""
    from mmdiff.models.gan import Decoder

    torch.manual_seed(0)
    fused = [torch.randn(1, 8, 8, 8), torch.randn(1, 16, 4, 4)]
    embedding = torch.zeros(1, 16)
    for refine in (0, 4):
        decoder = Decoder((8, 16), 1, 16, 4, out_channels=1, patch_size=2, refine_channels=refine).eval()
        assert hasattr(decoder, "refine") == bool(refine)
        with torch.no_grad():
            decoder.conv_out.weight[0::4] = 0  # the unfolded channels of the top-left pixel of each patch
            decoder.conv_out.bias[0::4] = 0
            out = decoder(fused, embedding)
        assert out.shape == (1, 1, 16, 16)
        top_left = out[0, 0, 0::2, 0::2]
        assert (top_left.std() == 0) == (refine == 0), refine


def test_refine_blur_leaves_no_period_2_pattern_in_the_output():
    """Unfolded features alternate from pixel to pixel whatever the 3 x 3 conv learns; with
    ``refine_blur`` their period-2 part is filtered out before it, so the output has none."""
    from mmdiff.models.gan import Decoder

    def nyquist_share(decoder):
        torch.manual_seed(0)
        with torch.no_grad():  # fresh weights: each position of a patch has its own
            out = decoder([torch.randn(2, 8, 16, 16), torch.randn(2, 16, 8, 8)], torch.zeros(2, 16))[:, 0]
        power = torch.fft.fft2(out - out.mean((-2, -1), keepdim=True)).abs().square()
        return float((power[:, 16, :].sum() + power[:, :, 16].sum()) / power.sum())

    settings = dict(block_out_channels=(8, 16), layers_per_block=1, embedding_dim=16, norm_num_groups=4,
                    out_channels=1, patch_size=2, refine_channels=4)
    torch.manual_seed(0)
    plain = nyquist_share(Decoder(**settings))
    torch.manual_seed(0)
    blurred = nyquist_share(Decoder(**settings, refine_blur=True))
    assert plain > 0.1 and blurred < plain / 50, (plain, blurred)
    with pytest.raises(ValueError, match="refine_blur needs refine_channels"):
        Decoder(**{**settings, "refine_channels": 0}, refine_blur=True)


def test_detail_transfer_starts_as_the_old_model_and_adds_each_present_source_fine_detail():
    """A model without detail transfer loads into one with it (only the zero coefficient layer is
    new) and gives the same output; a coefficient adds exactly that source's high-pass (x - [1 2 1]
    blur of x) to that target before the tanh; an absent source adds nothing; the coefficients learn."""
    settings = dict(refine_channels=4, refine_blur=True)
    old, new = lean_generator(**settings), lean_generator(**settings, detail_transfer=True)
    report = new.load_state_dict(old.state_dict(), strict=False)
    assert sorted(report.missing_keys) == ["decoder.detail.bias", "decoder.detail.weight"]
    x, present = images(size=16), mask(T1, T2)
    with torch.no_grad():
        before = old(x, present, 0)
        torch.testing.assert_close(new(x, present, 0), before, rtol=0, atol=0)
        bias = new.decoder.detail.bias.view(M, M)
        bias[FLAIR, T1] = 1.0  # FLAIR takes T1's fine detail
        bias[T1C, FLAIR] = 1.0  # T1C takes FLAIR's, which is absent
        after = new(x, present, 0)
    t1 = x[:, T1:T1 + 1]
    taps = torch.tensor([1.0, 2.0, 1.0])
    blur = (taps[:, None] * taps[None, :] / 16)[None, None]
    high_pass = (t1 - torch.nn.functional.conv2d(torch.nn.functional.pad(t1, (1, 1, 1, 1), mode="replicate"), blur))[:, 0]
    torch.testing.assert_close(torch.atanh(after[:, FLAIR]) - torch.atanh(before[:, FLAIR]), high_pass,
                               rtol=1e-3, atol=1e-3)
    assert high_pass.abs().mean() > 0.1  # random inputs: plenty of detail to carry
    others = [m for m in range(M) if m != FLAIR]
    torch.testing.assert_close(after[:, others], before[:, others], rtol=0, atol=0)
    with torch.no_grad():  # worked out for the asked targets only: the same values there, background elsewhere
        some = new(x, present, 0, targets=[FLAIR, T1C])
    torch.testing.assert_close(some[:, [FLAIR, T1C]], after[:, [FLAIR, T1C]], rtol=0, atol=1e-6)
    assert torch.all(some[:, [m for m in range(M) if m not in (FLAIR, T1C)]] == -1)
    new(x, present, 0)[:, FLAIR].square().mean().backward()
    assert new.decoder.detail.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="detail transfer needs refine_channels"):
        lean_generator(refine_channels=4, detail_transfer=True)


def test_detail_bands_add_the_a_trous_bands_which_sum_back_to_the_image_and_a_one_band_model_loads():
    """Two bands: a one-band model loads (only the zero second-band layer is new) and gives its output;
    the bands are x - blur(x) and blur(x) - blur_2(blur(x)) (taps two pixels apart), so with a
    smooth remainder they sum back to x; a second-band coefficient adds exactly that band; it learns."""
    settings = dict(refine_channels=4, refine_blur=True, detail_transfer=True)
    one, two = lean_generator(**settings), lean_generator(**settings, detail_bands=2)
    report = two.load_state_dict(one.state_dict(), strict=False)
    assert sorted(report.missing_keys) == ["decoder.detail_coarser.0.bias", "decoder.detail_coarser.0.weight"]
    x, present = images(size=16), mask(T1, T2)
    with torch.no_grad():
        before = one(x, present, 0)
        torch.testing.assert_close(two(x, present, 0), before, rtol=0, atol=0)
        fine, mid = two.decoder.detail_bands(x[:, T1:T1 + 1])
        two.decoder.detail_coarser[0].bias.view(M, M)[FLAIR, T1] = 1.0  # FLAIR takes T1's 2-4 pixel band
        after = two(x, present, 0)
    t1 = x[:, T1:T1 + 1]
    taps = torch.tensor([1.0, 2.0, 1.0])
    kernel = (taps[:, None] * taps[None, :] / 16)[None, None]
    blur = torch.nn.functional.conv2d(torch.nn.functional.pad(t1, (1,) * 4, mode="replicate"), kernel)
    blur2 = torch.nn.functional.conv2d(torch.nn.functional.pad(blur, (2,) * 4, mode="replicate"), kernel, dilation=2)
    torch.testing.assert_close(fine, t1 - blur)
    torch.testing.assert_close(mid, blur - blur2)
    torch.testing.assert_close(fine + mid + blur2, t1)
    assert mid.abs().mean() > 0.05
    torch.testing.assert_close(torch.atanh(after[:, FLAIR]) - torch.atanh(before[:, FLAIR]), mid[:, 0],
                               rtol=1e-3, atol=1e-3)
    two(x, present, 0)[:, FLAIR].square().mean().backward()
    assert two.decoder.detail_coarser[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="detail_bands must be >= 1"):
        lean_generator(**settings, detail_bands=0)


def test_detail_base_completes_the_transfer_to_the_whole_source_and_an_older_model_loads():
    """With the base, the bands and the base sum back to the source: a model without it loads (only the
    zero base layer is new) and gives its exact output; with every coefficient of one (target, source)
    pair at 1 the transfer adds that source itself, a per-voxel linear map as a regression's; it learns;
    an absent source adds nothing; and the base without the transfer is refused."""
    settings = dict(refine_channels=4, refine_blur=True, detail_transfer=True, detail_bands=2)
    old, new = lean_generator(**settings), lean_generator(**settings, detail_base=True)
    report = new.load_state_dict(old.state_dict(), strict=False)
    assert sorted(report.missing_keys) == ["decoder.detail_base.bias", "decoder.detail_base.weight"]
    x, present = images(size=16), mask(T1, T2)
    with torch.no_grad():
        before = new(x, present, 0)
        torch.testing.assert_close(before, old(x, present, 0), rtol=0, atol=0)
        new.decoder.detail.bias.view(M, M)[FLAIR, T1] = 1.0
        new.decoder.detail_coarser[0].bias.view(M, M)[FLAIR, T1] = 1.0
        bands_only = new(x, present, 0)
        new.decoder.detail_base.bias.view(M, M)[FLAIR, T1] = 1.0  # FLAIR takes all of T1
        whole = new(x, present, 0)
        new.decoder.detail_base.bias.view(M, M)[FLAIR, T1C] = 5.0  # T1C is not a source here
        torch.testing.assert_close(new(x, present, 0), whole, rtol=0, atol=0)
    added = torch.atanh(whole[:, FLAIR]) - torch.atanh(before[:, FLAIR])
    torch.testing.assert_close(added, x[:, T1], rtol=1e-3, atol=1e-3)
    assert (torch.atanh(whole[:, FLAIR]) - torch.atanh(bands_only[:, FLAIR])).abs().mean() > 0.05
    new(x, present, 0)[:, FLAIR].square().mean().backward()
    assert new.decoder.detail_base.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="detail_base needs detail transfer"):
        lean_generator(refine_channels=4, refine_blur=True, detail_base=True)


def test_fine_head_starts_as_the_old_model_draws_at_pixel_scale_and_ignores_absent_sources():
    """A model without the full-resolution head loads into one with it and gives its exact output
    (the head's last conv starts at zero); trained, the head changes the asked targets only, draws
    pixel-scale structure the low-passed path cannot (a one-pixel line in a source moves the output
    at that line and not two pixels away), never reads an absent source, and learns."""
    settings = dict(refine_channels=4, refine_blur=True, detail_transfer=True)
    old, new = lean_generator(**settings), lean_generator(**settings, fine_channels=6)
    report = new.load_state_dict(old.state_dict(), strict=False)
    assert all(key.startswith("decoder.fine_") for key in report.missing_keys) and len(report.missing_keys) == 6
    x, present = images(size=16), mask(T1, T2)
    with torch.no_grad():
        before = old(x, present, 0)
        torch.testing.assert_close(new(x, present, 0), before, rtol=0, atol=0)
        torch.nn.init.normal_(new.decoder.fine_out.weight, std=0.3)
        after = new(x, present, 0, targets=[T1C, FLAIR])
        assert (after[:, [T1C, FLAIR]] - before[:, [T1C, FLAIR]]).abs().mean() > 1e-3
        assert torch.all(after[:, T2] == -1)  # not asked: background, as without the head
        # a one-pixel line in T1: through the head, it reaches its own row and the next ones
        line = x.clone()
        line[:, T1, 8] += 1.0
        head = lambda images: new(images, present, 0)[:, T1C] - old(images, present, 0)[:, T1C]
        change = (head(line) - head(x)).abs().mean((0, 2))
        assert change[8] > 10 * change[3] and change[8] > 1e-3, change
        # an absent source is never read
        other = x.clone()
        other[:, FLAIR] = 5.0
        torch.testing.assert_close(new(other, present, 0), new(x, present, 0), rtol=0, atol=0)
    new(x, present, 0)[:, T1C].square().mean().backward()
    assert new.decoder.fine_in.weight.grad.abs().sum() > 0 and new.decoder.fine_out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="full-resolution head needs"):
        lean_generator(refine_channels=4, fine_channels=6)


def test_context_is_live_masked_like_the_sources_and_defaults_to_the_slice_itself():
    model = lean_generator().eval()
    perturb_modulations(model)
    x, sources = images(), mask(T1, FLAIR)
    neighbours = torch.rand(2, M, 2, 16, 16) * 2 - 1
    with torch.no_grad():
        out = model(x, sources, 0, context=neighbours)
        assert not torch.allclose(out, model(x, sources, 0, context=-neighbours))
        # a non-source's neighbours are masked out like the non-source itself
        changed = neighbours.clone()
        changed[:, T2] = 5.0
        torch.testing.assert_close(model(x, sources, 0, context=changed), out)
        same = x[:, :, None].expand(-1, -1, 2, -1, -1)
        torch.testing.assert_close(model(x, sources, 0), model(x, sources, 0, context=same))
    with pytest.raises(ValueError, match="context has shape"):
        model(x, sources, 0, context=neighbours[:, :, :1])


def test_first_conv_reads_only_the_sources_some_row_has_with_the_full_convs_result():
    """An absent source's planes are zero, so the first conv leaves its weights out: a sample gives
    the same output whether its batch-mates' extra sources make the conv read every channel or not,
    and fewer sources cost fewer FLOPs."""
    model = lean_generator(refine_channels=8, refine_blur=True, detail_transfer=True).eval()
    perturb_modulations(model)
    x, context = images(), torch.rand(2, M, 2, 16, 16) * 2 - 1
    sources = mask(T1, FLAIR)
    everything = sources.clone()
    everything[1] = True  # row 1 has every sequence: the conv reads all its input channels
    with torch.no_grad():
        alone = model(x[:1], sources[:1], 0, context=context[:1])
        beside = model(x, everything, 0, context=context)[:1]
    torch.testing.assert_close(alone, beside, atol=1e-6, rtol=0)
    assert model._input_channels(list(range(M))) is None
    # T1 and FLAIR: image, two neighbours and mask plane each, in 2 x 2 patches, in forward's order
    channels = model._input_channels([T1, FLAIR]).tolist()
    planes = [T1, FLAIR, M + 2 * T1, M + 2 * T1 + 1, M + 2 * FLAIR, M + 2 * FLAIR + 1, 3 * M + T1, 3 * M + FLAIR]
    assert channels == [4 * plane + p for plane in planes for p in range(4)]

    def flops(present):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(images(size=32), present, 0)
        return counter.get_total_flops()

    assert flops(mask(T1)) < flops(mask(T1, T2, FLAIR)) < flops(mask(*range(M)))


def test_lean_generator_absent_sources_get_no_gradient_through_the_input():
    """Zero gradient for a missing sequence: its pixels (and neighbours) cannot reach the output."""
    model = lean_generator()
    x = images().requires_grad_(True)
    context = (torch.rand(2, M, 2, 16, 16) * 2 - 1).requires_grad_(True)
    model(x, mask(T1, FLAIR), 0, context=context).square().mean().backward()
    assert x.grad[:, T2].abs().sum() == 0 and context.grad[:, T2].abs().sum() == 0
    assert x.grad[:, T1].abs().sum() > 0 and context.grad[:, FLAIR].abs().sum() > 0


def test_pmm_layout_decodes_only_the_asked_targets():
    model = MultiModalGenerator(num_datasets=2, block_out_channels=(8, 16), embedding_dim=16,
                                norm_num_groups=4).eval()
    x, sources = images(), mask(T1, T2)
    with torch.no_grad():
        full = model(x, sources, 0)
        some = model(x, sources, 0, targets=[FLAIR])
    torch.testing.assert_close(some[:, FLAIR], full[:, FLAIR])
    assert torch.all(some[:, T1] == -1)


def test_lesion_pixels_weigh_more_in_the_synthesis_l1():
    target = torch.zeros(1, 2, 4, 4)
    pred = torch.zeros(1, 2, 4, 4)
    pred[0, 1, 0, 0] = 1.0  # one wrong pixel of 16
    seg = torch.zeros(1, 4, 4, dtype=torch.uint8)
    weight = torch.tensor([[0.0, 1.0]])
    plain = selective_l1(pred, target, weight)
    assert plain.item() == pytest.approx(1 / 16)
    seg[0, 0, 0] = 2
    lesion = selective_l1(pred, target, weight, lesion_pixel_weight(seg, 4.0))
    assert lesion.item() == pytest.approx(5 / (16 + 4))
    seg[0, 0, 0], seg[0, 3, 3] = 0, 1  # the error outside the lesion counts less than before
    assert selective_l1(pred, target, weight, lesion_pixel_weight(seg, 4.0)).item() == pytest.approx(1 / 20)


def test_lesion_weight_per_label_weights_only_the_named_labels():
    seg = torch.tensor([[[0, 1], [2, 3]]], dtype=torch.uint8)
    weight = lesion_pixel_weight(seg, {1: 4, 3: 16})
    torch.testing.assert_close(weight, torch.tensor([[[1.0, 5.0], [1.0, 17.0]]]))
    torch.testing.assert_close(lesion_pixel_weight(seg, {1: 4, 2: 4, 3: 4}), lesion_pixel_weight(seg, 4.0))
    with pytest.raises(ConfigError, match="maps seg labels"):
        lesion_weight_config({"enhancing": 16})
    assert lesion_weight_config({"3": "16"}) == {3: 16.0} and lesion_weight_config(None) == 0.0


def test_target_weight_scales_one_sequence_share_of_the_synthesis_loss(tiny_cache, monkeypatch):
    """``model.target_weight: {t1c: 3}``: T1C's synthesis L1 counts 3x in the mean over a batch's targets."""
    import mmdiff.training.stages as stages
    from mmdiff.training import load_config

    modalities = ["t1", "t2", "t1c", "flair"]
    torch.testing.assert_close(target_weight_config({"T1CE": 3}, modalities), torch.tensor([1.0, 1.0, 3.0, 1.0]))
    assert target_weight_config(None, modalities) is None and target_weight_config({}, modalities) is None
    with pytest.raises(ConfigError, match="does not know"):
        target_weight_config({"pd": 2}, modalities)
    with pytest.raises(ConfigError, match="positive"):
        target_weight_config({"t1c": 0}, modalities)
    # two targets with errors 0.1 (T1C) and 0.3: equal weights 0.2, T1C 3x (0.3 + 0.3) / 4 = 0.15
    pred, target = torch.zeros(1, 2, 4, 4), torch.cat([torch.full((1, 1, 4, 4), 0.1), torch.full((1, 1, 4, 4), 0.3)], 1)
    assert selective_l1(pred, target, torch.tensor([[1.0, 1.0]])).item() == pytest.approx(0.2)
    assert selective_l1(pred, target, torch.tensor([[3.0, 1.0]])).item() == pytest.approx(0.15)

    config = load_config("gan-tiny", ["model.target_weight={t1c: 3}"])
    seen = []
    original = stages.generator_loss
    monkeypatch.setattr(stages, "generator_loss",
                        lambda fake, x, synthesis_w, *a, **k: seen.append(synthesis_w.clone()) or original(fake, x, synthesis_w, *a, **k))
    stage = stages.GANStage(config, ["brats", "ms"], ["t1", "t2", "t1c", "flair", "dwi", "adc"], "cpu")
    available = torch.ones(2, 6, dtype=torch.bool)
    batch = {"images": torch.rand(2, 6, 16, 16), "available": available, "dataset_id": torch.zeros(2, dtype=torch.long),
             "seg": torch.zeros(2, 16, 16, dtype=torch.uint8), "brain_mask": torch.ones(2, 16, 16, dtype=torch.bool)}

    for step in range(6):
        stage.training_step(batch, StepAccelerator(), step)
    weights = torch.cat(seen)
    assert set(weights.unique().tolist()) <= {0.0, 1.0, 3.0} and (weights[:, 2] == 3).any()
    assert ((weights[:, 2] == 3) | (weights[:, 2] == 0)).all() and (weights[:, [0, 1, 3, 4, 5]] <= 1).all()


def test_dataset_lesion_weight_weights_each_image_by_its_own_datasets_labels(monkeypatch):
    """``model.dataset_lesion_weight: {brats: {1: 24, 3: 32}}``: a BraTS image's label 1 (a glioma's core)
    counts 25x while an MS image's label 1 (its lesion) keeps ``model.lesion_weight``'s 9x, whatever id
    the dataset dropout gives the generator; unknown datasets are refused."""
    import mmdiff.training.stages as stages
    from mmdiff.losses import dataset_lesion_pixel_weight
    from mmdiff.training import load_config
    from mmdiff.training.stages import dataset_lesion_weight_config

    names = ["brats", "ms"]
    by_dataset = dataset_lesion_weight_config({"brats": {1: 24, 3: 32}}, names)
    assert by_dataset == {0: {1: 24.0, 3: 32.0}}
    with pytest.raises(ConfigError, match="names wml, not among the datasets trained on .brats, ms."):
        dataset_lesion_weight_config({"wml": 8}, names)
    with pytest.raises(ConfigError, match="maps datasets to lesion weights"):
        dataset_lesion_weight_config(8, names)
    seg = torch.tensor([[[0, 1, 3]], [[0, 1, 3]], [[0, 1, 3]]], dtype=torch.uint8)  # [B=3, 1, 3]
    ids = torch.tensor([0, 1, 0])
    weight = dataset_lesion_pixel_weight(seg, ids, {1: 8, 3: 32}, by_dataset)
    assert weight[:, 0].tolist() == [[1, 25, 33], [1, 9, 33], [1, 25, 33]]
    assert dataset_lesion_pixel_weight(seg, ids, 0.0, {}) is None  # no extra weight anywhere: plain L1
    only_brats = dataset_lesion_pixel_weight(seg, ids, 0.0, by_dataset)
    assert only_brats[:, 0].tolist() == [[1, 25, 33], [1, 1, 1], [1, 25, 33]]

    config = load_config("gan-tiny", ["model.lesion_weight={1: 8, 3: 32}", "model.dataset_lesion_weight={brats: {1: 24, 3: 32}}",
                                      "train.dataset_dropout=1.0"])
    seen = []
    original = stages.generator_loss
    monkeypatch.setattr(stages, "generator_loss",
                        lambda *a, pixel_weight=None, **k: seen.append(pixel_weight.clone()) or original(*a, pixel_weight=pixel_weight, **k))
    stage = stages.GANStage(config, names, ["t1", "t2", "t1c", "flair", "dwi", "adc"], "cpu")
    seg = torch.zeros(2, 16, 16, dtype=torch.uint8)
    seg[:, 4:8, 4:8] = 1
    batch = {"images": torch.rand(2, 6, 16, 16), "available": torch.ones(2, 6, dtype=torch.bool),
             "dataset_id": torch.tensor([0, 1]), "seg": seg, "brain_mask": torch.ones(2, 16, 16, dtype=torch.bool)}
    stage.training_step(batch, StepAccelerator(), 0)
    assert seen[0][:, 5, 5].tolist() == [25, 9] and seen[0][:, 0, 0].tolist() == [1, 1]


def test_slice_dataset_context_holds_the_neighbouring_slices(tiny_cache):
    flat = SliceDataset(tiny_cache, split="train")
    deep = SliceDataset(tiny_cache, split="train", context_slices=1)
    case = flat.cases[0]
    order = flat.case_slices(case["case_id"], case["dataset"])
    first, middle = deep[order[0]], deep[order[1]]
    assert middle["context"].shape == (len(flat.modalities), 2) + tuple(flat[order[1]]["images"].shape[1:])
    torch.testing.assert_close(middle["context"][:, 0], flat[order[0]]["images"])
    torch.testing.assert_close(middle["context"][:, 1], flat[order[2]]["images"])
    assert first["context"][:, 0].abs().sum() == 0  # below the first stored slice: zeros
    assert "context" not in flat[order[1]]


def test_flipped_items_are_left_right_mirrors_of_every_array_half_the_time_and_repeat_on_resume(tiny_cache):
    plain = SliceDataset(tiny_cache, split="train", context_slices=1, crop=24)
    mirrored = SliceDataset(tiny_cache, split="train", context_slices=1, crop=24, flip=True)
    flags = [mirrored[i]["flipped"] for i in range(len(mirrored))]
    assert 0.3 < np.mean(flags) < 0.7 and not any(plain[i]["flipped"] for i in range(len(plain)))
    i = flags.index(True)
    a, b = plain[i], mirrored[i]  # same crop window: the flip has its own random stream
    for key in ("images", "brain_mask", "seg", "context"):
        torch.testing.assert_close(b[key], a[key].flip(-2))  # the first in-plane axis: left-right
    assert b["images"].abs().sum() > 0 and not torch.equal(b["images"], a["images"])
    torch.testing.assert_close(mirrored[flags.index(False)]["images"], plain[flags.index(False)]["images"])
    again = SliceDataset(tiny_cache, split="train", context_slices=1, crop=24, flip=True)
    assert [again[i]["flipped"] for i in range(len(again))] == flags  # a function of (seed, epoch, index)
    again.set_epoch(1)
    assert [again[i]["flipped"] for i in range(len(again))] != flags
    torch.utils.data.default_collate([b, mirrored[i + 1]])  # batches as before


def _lean_2_5d_pipeline_and_volume(seed: int, size: int, depth: int):
    """A lean 2.5D GAN pipeline with perturbed modulations, and a volume with a random block of brain."""
    network = lean_generator(num_datasets=1, dataset_names=["brats"]).eval()
    perturb_modulations(network)
    pipe = MMGANPipeline(network)
    pipe.set_progress_bar_config(disable=True)
    volume = np.zeros((size, size, depth), np.float32)
    volume[4:size - 4, 4:size - 4] = np.random.default_rng(seed).uniform(100, 200, (size - 8, size - 8, depth))
    return pipe, volume


def test_gan_pipeline_runs_a_2_5d_model_on_a_volume_with_its_neighbours():
    """Slice k of a volume gets slices k-1 and k+1 as context: swapping them (same voxels, so the same
    normalisation) changes slice k's result, and a volume's result does not depend on the batching."""
    pipe, volume = _lean_2_5d_pipeline_and_volume(seed=0, size=20, depth=7)
    images_ = {"t1": volume, "flair": volume[::-1].copy()}
    one = pipe(images=images_, targets=["t2"], batch_size=1).images["t2"]
    many = pipe(images=images_, targets=["t2"], batch_size=5).images["t2"]
    np.testing.assert_allclose(one, many, atol=1e-5)
    swapped = {k: v[..., [0, 1, 4, 3, 2, 5, 6]] for k, v in images_.items()}
    other = pipe(images=swapped, targets=["t2"]).images["t2"]
    assert not np.allclose(other[..., 3], one[..., 3], atol=1e-4)
    for k in (0, 6):  # slices whose neighbours did not change
        np.testing.assert_allclose(other[..., k], one[..., k], atol=1e-5)


def test_flip_average_is_the_mean_of_the_volume_and_its_left_right_mirror_run_alike():
    """pipe(V, flip_average=True) = (pipe(V) + mirror(pipe(mirror(V)))) / 2, neighbours and all; the
    second look differs from the first (the network is not mirror-symmetric), so the mean is new."""
    pipe, volume = _lean_2_5d_pipeline_and_volume(seed=1, size=24, depth=5)
    images_ = {"t1": volume, "flair": volume[:, ::-1].copy()}
    mirror = {k: v[::-1].copy() for k, v in images_.items()}
    exact = {"targets": ["t2", "t1c"], "precision": "float32"}  # "auto" is bf16 on a CPU with native bf16
    plain = pipe(images=images_, **exact).images
    looked_twice = pipe(images=images_, flip_average=True, batch_size=2, **exact).images
    second = pipe(images=mirror, **exact).images
    for target in ("t2", "t1c"):
        np.testing.assert_allclose(looked_twice[target], (plain[target] + second[target][::-1]) / 2, atol=1e-5)
        assert not np.allclose(second[target][::-1], plain[target], atol=1e-3)


def test_training_validation_reports_the_lesion_contrast_error(tiny_cache, tmp_path):
    """Checkpoints are chosen by lesions too: validation logs |synthetic / real lesion contrast - 1|."""
    import json

    from mmdiff.cli import main

    assert main(["train", "--config", "gan-tiny", "--output-dir", str(tmp_path / "run"), "--max-steps", "2",
                 f"data.cache={tiny_cache}", "validation.every=0", "checkpoint.every=0"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "val/psnr" in r][-1]
    assert final["val/contrast_error"] >= 0 and any(k.startswith("val/contrast_error_") for k in final)


def test_lambda_ssim_scores_the_synthesized_images_inside_the_brain_in_a_training_step(monkeypatch):
    """``model.lambdas.lambda_ssim``: the GAN stage adds 1 - SSIM inside the brain mask; a generator exact
    inside the brain (whatever it draws outside) costs nothing, one off inside it does."""
    import mmdiff.training.stages as stages
    from mmdiff.training import load_config

    lambdas = "model.lambdas={lambda_syn: 100.0, lambda_rec: 30.0, lambda_adv: 1.0, lambda_ssim: 5.0}"
    stage = stages.GANStage(load_config("gan-tiny", [lambdas]), ["brats", "ms"],
                            ["t1", "t2", "t1c", "flair", "dwi", "adc"], "cpu")
    brain = torch.zeros(2, 24, 24, dtype=torch.bool)
    brain[:, 4:20, 5:19] = True
    images = torch.rand(2, 6, 24, 24, generator=torch.Generator().manual_seed(0)) * brain[:, None]
    batch = {"images": images, "available": torch.ones(2, 6, dtype=torch.bool), "dataset_id": torch.zeros(2, dtype=torch.long),
             "seg": torch.zeros(2, 24, 24, dtype=torch.uint8), "brain_mask": brain}
    logs = []
    for inside in (images * 2 - 1, images * 2 - 1 + 0.3 * torch.randn(2, 6, 24, 24)):
        drawn = torch.where(brain[:, None], inside, torch.full_like(images, 0.5)).requires_grad_()
        monkeypatch.setattr(stage.models["generator"], "forward", lambda *args, drawn=drawn, **kwargs: drawn * 1)
        logs.append(stage.training_step(batch, StepAccelerator(), 0))
    assert abs(logs[0]["synthesis_ssim"]) < 1e-6 and logs[1]["synthesis_ssim"] > 0.1


@pytest.mark.parametrize("inside_brain", [True, False])
def test_inside_brain_scores_the_generator_on_the_brain_as_the_pipelines_return_it(monkeypatch, inside_brain):
    """``model.inside_brain``: the generator's output is background outside the brain mask before the
    losses and the discriminators, as a pipeline returns it (zeros outside the mask). A generator exact
    inside the brain and wrong outside then has no synthesis or reconstruction error; scored on the
    whole slice it has, and the discriminators see its wrong background."""
    import mmdiff.training.stages as stages
    from mmdiff.pipelines.common import inside_brain as composite
    from mmdiff.training import load_config

    modalities = ["t1", "t2", "t1c", "flair", "dwi", "adc"]
    stage = stages.GANStage(load_config("gan-tiny", [f"model.inside_brain={str(inside_brain).lower()}"]),
                            ["brats", "ms"], modalities, "cpu")
    assert stage.models["generator"].config.inside_brain is inside_brain  # saved with the weights, for their users
    brain = torch.zeros(2, 16, 16, dtype=torch.bool)
    brain[:, 3:13, 4:12] = True
    images = torch.rand(2, 6, 16, 16) * brain[:, None]  # the cache's images are 0 outside the brain
    batch = {"images": images, "available": torch.ones(2, 6, dtype=torch.bool), "dataset_id": torch.zeros(2, dtype=torch.long),
             "seg": torch.zeros(2, 16, 16, dtype=torch.uint8), "brain_mask": brain}
    exact_inside = torch.where(brain[:, None], images * 2 - 1, torch.full_like(images, 0.5)).requires_grad_()
    monkeypatch.setattr(stage.models["generator"], "forward", lambda *args, **kwargs: exact_inside * 1)
    judged, original_discriminators = [], stage.models["discriminators"].forward
    monkeypatch.setattr(stage.models["discriminators"], "forward",
                        lambda sources, shown, targets: judged.append(shown.detach()) or original_discriminators(sources, shown, targets))
    logs = stage.training_step(batch, StepAccelerator(), 0)
    outside = ~brain[:, None].expand(-1, judged[-1].shape[1], -1, -1)
    if inside_brain:
        assert logs["synthesis_l1"] == 0 and logs["reconstruction_l1"] == 0
        assert (judged[-1][outside] == -1).all()  # the fake the generator is judged on: background outside
        assert exact_inside.grad is not None and (exact_inside.grad[~brain[:, None].expand_as(images)] == 0).all()
    else:
        assert logs["synthesis_l1"] > 0.5 and logs["reconstruction_l1"] > 0.5
        assert (judged[-1][outside] == 0.5).all()
    torch.testing.assert_close(composite(exact_inside.detach(), brain), images * 2 - 1)


def test_source_gamma_changes_the_sources_the_generator_reads_and_not_what_it_is_scored_against(monkeypatch):
    """``train.source_gamma``: the sources and their axial neighbours reach the generator raised to a
    power drawn per slice and sequence, a function of (seed, step); the losses compare the output with
    the images as stored (a generator that returns them exactly has no L1 error)."""
    import mmdiff.training.stages as stages
    from mmdiff.data.contrast import draw_gammas
    from mmdiff.training import load_config

    modalities = ["t1", "t2", "t1c", "flair", "dwi", "adc"]
    stage = stages.GANStage(load_config("gan-tiny", ["train.source_gamma=[0.5,2.0]"]), ["brats", "ms"], modalities,
                            "cpu")
    brain = torch.zeros(2, 16, 16, dtype=torch.bool)
    brain[:, 3:13, 4:12] = True
    images = torch.rand(2, 6, 16, 16) * brain[:, None]
    context = torch.rand(2, 6, 2, 16, 16) * brain[:, None, None]
    batch = {"images": images, "context": context, "available": torch.ones(2, 6, dtype=torch.bool),
             "dataset_id": torch.zeros(2, dtype=torch.long), "seg": torch.zeros(2, 16, 16, dtype=torch.uint8),
             "brain_mask": brain}
    seen = []

    def generator(inputs, sources, dataset_id, context=None, **_):
        seen.append((inputs, sources, context))
        return (images * 2 - 1).requires_grad_()  # the stored images, exactly

    monkeypatch.setattr(stage.models["generator"], "forward", generator)
    logs = stage.training_step(batch, StepAccelerator(), 3)
    inputs, sources, given_context = seen[-1]
    gammas = draw_gammas((0.5, 2.0), (2, 6), seed=0, step=3)
    assert ((gammas >= 0.5) & (gammas <= 2.0)).all() and gammas.std() > 0.1
    changed = images ** gammas[:, :, None, None]
    torch.testing.assert_close(inputs, (changed * 2 - 1) * sources[:, :, None, None])
    assert not torch.allclose(inputs, (images * 2 - 1) * sources[:, :, None, None])
    torch.testing.assert_close(given_context, context ** gammas[:, :, None, None, None] * 2 - 1)
    assert logs["synthesis_l1"] == 0 and logs["reconstruction_l1"] == 0
    # the powers are a function of the step: the same step draws the same ones, another step others
    torch.testing.assert_close(draw_gammas((0.5, 2.0), (2, 6), 0, 3), gammas, rtol=0, atol=0)
    assert not torch.allclose(draw_gammas((0.5, 2.0), (2, 6), 0, 4), gammas)
    # off by default: the sources as stored
    plain = stages.GANStage(load_config("gan-tiny"), ["brats", "ms"], modalities, "cpu")
    monkeypatch.setattr(plain.models["generator"], "forward", generator)
    plain.training_step(batch, StepAccelerator(), 3)
    inputs, sources, _ = seen[-1]
    torch.testing.assert_close(inputs, (images * 2 - 1) * sources[:, :, None, None])


def test_dataset_dropout_from_drops_only_the_named_datasets_ids(monkeypatch):
    """``train.dataset_dropout_from``: the null embedding is trained on the named datasets' slices only."""
    import mmdiff.training.stages as stages
    from mmdiff.models import NULL_DATASET_ID
    from mmdiff.training import load_config

    names, modalities = ["glioma", "brats", "ms"], ["t1", "t2", "t1c", "flair", "dwi", "adc"]
    ids = torch.tensor([0, 1, 2, 0, 1, 2])
    config = load_config("gan-tiny", ["train.dataset_dropout=1.0", "train.dataset_dropout_from=[brats,ms]"])
    stage = stages.GANStage(config, names, modalities, "cpu")
    assert stage._dataset_ids({"dataset_id": ids}).tolist() == [0, NULL_DATASET_ID, NULL_DATASET_ID] * 2
    every = stages.GANStage(load_config("gan-tiny", ["train.dataset_dropout=1.0"]), names, modalities, "cpu")
    assert (every._dataset_ids({"dataset_id": ids}) == NULL_DATASET_ID).all()
