"""Synthesis conditions and selective supervision weights."""

import itertools

import numpy as np
import pytest
import torch

from mmdiff.data.conditions import (
    MODES,
    SynthesisConditionSampler,
    allowed_conditions,
    loss_weights,
)
from mmdiff.modalities import availability, mask_key, parse_mask_key

# every non-empty availability mask over the six modalities
ALL_MASKS = [np.array(bits, dtype=bool) for bits in itertools.product([0, 1], repeat=6) if any(bits)]


def masks(*keys):
    """Bool tensor [B, M] from mask keys."""
    return torch.from_numpy(np.stack([parse_mask_key(k) for k in keys]))


@pytest.mark.parametrize("mode", MODES)
def test_conditions_respect_availability(mode):
    for available in ALL_MASKS:
        sources, targets = allowed_conditions(mask_key(available), mode)
        assert len(sources) > 0
        assert not (sources & ~available).any(), "a source outside the available set"
        assert not (targets & ~available).any(), "a target without ground truth"
        assert not (sources & targets).any()
        assert sources.any(axis=1).all(), "a condition without a source"
        if available.sum() >= 2:
            assert targets.any(axis=1).all(), "nothing left to supervise the synthesis on"
        else:
            assert (sources == available).all() and not targets.any()  # reconstruction only


def test_modes_give_the_right_counts():
    available = parse_mask_key("111101")  # five available
    n_sources = {mode: allowed_conditions("111101", mode)[0].sum(1) for mode in MODES}
    n_targets = {mode: allowed_conditions("111101", mode)[1].sum(1) for mode in MODES}
    assert set(n_sources["one-to-one"]) == {1} and set(n_targets["one-to-one"]) == {1}
    assert set(n_sources["many-to-one"]) == {2, 3, 4} and set(n_targets["many-to-one"]) == {1}
    assert set(n_sources["all-but-one"]) == {4} and set(n_targets["all-but-one"]) == {1}
    assert set(n_sources["random"]) == {1, 2, 3, 4}
    assert (n_sources["random"] + n_targets["random"] == available.sum()).all()
    # every pair is listed once: 5*4 one-to-one, 5*(2^4 - 1 - 4) many-to-one, 5 all-but-one, 2^5 - 2 random
    assert [len(n_sources[m]) for m in ("one-to-one", "many-to-one", "all-but-one", "random")] == [20, 55, 5, 30]
    # with two available, many-to-one has only one source to give
    assert set(allowed_conditions("100100", "many-to-one")[0].sum(1)) == {1}


def test_sampler_draws_every_allowed_condition_uniformly():
    sampler = SynthesisConditionSampler("random", seed=0)
    available = availability(["t1", "t2", "flair"])
    draws = [mask_key(sampler(available)[0]) for _ in range(1200)]
    counts = {key: draws.count(key) for key in set(draws)}
    assert len(counts) == 6  # 2^3 - 2 non-empty proper subsets
    assert min(counts.values()) > 150  # ~200 each


def test_sampler_returns_the_input_type_and_is_seeded():
    available = availability(["t1", "t2", "flair", "adc"])
    sources, targets = SynthesisConditionSampler("one-to-one")(available)
    assert isinstance(sources, np.ndarray) and sources.dtype == bool and sources.sum() == 1
    sources, targets = SynthesisConditionSampler("one-to-one")(torch.from_numpy(available))
    assert isinstance(sources, torch.Tensor) and sources.dtype == torch.bool and targets.sum() == 1

    def draws(sampler, generator=None):
        return [mask_key(sampler(available, generator)[0]) for _ in range(20)]

    assert draws(SynthesisConditionSampler(seed=4)) == draws(SynthesisConditionSampler(seed=4))
    assert draws(SynthesisConditionSampler(seed=4)) != draws(SynthesisConditionSampler(seed=5))
    sampler = SynthesisConditionSampler(seed=0)
    assert draws(sampler, torch.Generator().manual_seed(9)) == draws(sampler, torch.Generator().manual_seed(9))


@pytest.mark.parametrize("mode", MODES)
def test_batch_same_for_batch_gives_one_condition(mode):
    available = torch.from_numpy(availability(["t1", "t2", "t1c", "flair"])).expand(8, -1)
    sampler = SynthesisConditionSampler(mode, seed=1)
    for _ in range(10):
        sources, targets = sampler.batch(available)
        assert sources.shape == targets.shape == (8, 6) and sources.dtype == torch.bool
        assert (sources == sources[0]).all() and (targets == targets[0]).all()
        assert not (sources & ~available).any() and sources.any(1).all() and targets.any(1).all()


def test_batch_per_sample_conditions():
    available = masks(*["111111", "100100", "000001"] * 20)
    sources, targets = SynthesisConditionSampler(seed=0).batch(available, same_for_batch=False)
    assert not (sources & ~available).any() and not (targets & ~available).any()
    assert sources.any(1).all()
    assert (targets.any(1) == (available.sum(1) >= 2)).all()
    assert len({mask_key(s) for s in sources[0::3]}) > 1  # samples of a group differ


def test_batch_rejects_mixed_masks_and_bad_shapes():
    sampler = SynthesisConditionSampler()
    mixed = masks("110100", "111111")
    with pytest.raises(ValueError, match="110100, 111111"):
        sampler.batch(mixed)
    with pytest.raises(ValueError, match=r"expected \[batch, 6\]"):
        sampler.batch(torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no modality is available"):
        sampler(np.zeros(6, dtype=bool))
    with pytest.raises(ValueError, match="unknown synthesis mode 'two-to-one'"):
        SynthesisConditionSampler("two-to-one")


def test_loss_weights_are_zero_without_ground_truth():
    available = masks("110101")
    sources = masks("100001")
    synthesis, reconstruction = loss_weights(available, sources)
    assert synthesis.dtype == reconstruction.dtype == torch.float32
    assert synthesis.tolist() == [[0, 1, 0, 1, 0, 0]]
    assert reconstruction.tolist() == [[1, 0, 0, 0, 0, 1]]
    missing = ~available
    assert (synthesis[missing] == 0).all() and (reconstruction[missing] == 0).all()
    assert torch.equal(synthesis + reconstruction, available.float())
