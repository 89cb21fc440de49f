"""The Modality-Consistent Batch Scheduler: homogeneous, full, reproducible batches, also under accelerate."""

import json
import os
from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader, Dataset

from mmdiff.data.sampler import ModalityConsistentBatchSampler, group_keys

# Four groups: sizes 10 (pads to 12), 4 (exactly one batch), 1 (smaller than a batch), 7 (pads to 8).
GROUPS = [(0, "111111")] * 10 + [(1, "110100")] * 4 + [(2, "000111")] + [(1, "100100")] * 7
GROUPS = [GROUPS[i] for i in np.random.default_rng(0).permutation(len(GROUPS))]  # interleave groups
BATCH_SIZE = 4


class IndexDataset(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def batches_of(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


@pytest.mark.parametrize("shuffle", [True, False])
def test_batches_are_full_homogeneous_and_cover_every_sample(shuffle):
    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=3, shuffle=shuffle)
    for epoch in range(3):
        batches = batches_of(sampler, epoch)
        assert len(batches) == len(sampler) == 3 + 1 + 1 + 2
        assert all(len(b) == BATCH_SIZE for b in batches)
        assert all(len({GROUPS[i] for i in b}) == 1 for b in batches)
        assert {i for b in batches for i in b} == set(range(len(GROUPS)))
        assert all(isinstance(i, int) for b in batches for i in b)


def test_padding_only_duplicates_members_of_the_same_group():
    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE)
    for epoch in range(5):
        counts = Counter(i for b in batches_of(sampler, epoch) for i in b)
        per_group = Counter()
        for i, n in counts.items():
            per_group[GROUPS[i]] += n
        group_sizes = Counter(GROUPS)
        for key, size in group_sizes.items():
            assert per_group[key] == -(-size // BATCH_SIZE) * BATCH_SIZE  # padded to a multiple
        # duplicates spread over the group: within a group, counts differ by at most one
        for key in group_sizes:
            members = [counts[i] for i in range(len(GROUPS)) if GROUPS[i] == key]
            assert max(members) - min(members) <= 1
    singleton = GROUPS.index((2, "000111"))
    assert [singleton] * BATCH_SIZE in batches_of(sampler)


def test_epoch_changes_the_order_and_seed_plus_epoch_reproduces_it():
    a = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=7)
    b = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=7)
    assert batches_of(a, 0) == batches_of(b, 0)
    assert batches_of(a, 1) == batches_of(b, 1)
    assert batches_of(a, 0) != batches_of(a, 1)
    assert batches_of(a, 0) != batches_of(ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=8), 0)
    assert list(a) == list(a)  # iterating twice in one epoch gives the same batches


def test_batches_are_shuffled_across_groups():
    groups = [("a", "1")] * 40 + [("b", "1")] * 40
    batches = batches_of(ModalityConsistentBatchSampler(groups, 4, seed=0))
    first_half = {groups[b[0]] for b in batches[:10]}
    assert first_half == {("a", "1"), ("b", "1")}


def test_unshuffled_order_is_fixed_and_sorted():
    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, shuffle=False, seed=1)
    batches = batches_of(sampler, 0)
    assert batches == batches_of(sampler, 5)
    keys = [GROUPS[b[0]] for b in batches]
    assert keys == sorted(keys)
    members = [i for b in batches for i in b if GROUPS[i] == (0, "111111")]
    in_order = sorted(i for i in range(len(GROUPS)) if GROUPS[i] == (0, "111111"))
    assert members == in_order + in_order[:2]



def test_invalid_arguments():
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        ModalityConsistentBatchSampler(GROUPS, 0)
    with pytest.raises(ValueError, match="empty"):
        ModalityConsistentBatchSampler([], 4)


def test_group_keys():
    masks = np.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=bool)
    assert group_keys(np.array([2, 0]), masks) == [(2, "110100"), (0, "111111")]
    with pytest.raises(ValueError, match="1 dataset ids but 2"):
        group_keys([2], masks)


def test_works_as_dataloader_batch_sampler():
    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=2)
    loader = DataLoader(IndexDataset(len(GROUPS)), batch_sampler=sampler)
    assert len(loader) == len(sampler)
    loaded = [batch.tolist() for batch in loader]
    assert loaded == list(sampler)


def _record_accelerate_batches(out_dir, seed):
    """Runs in each launched process: records the batches this rank gets, for two epochs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # A forked child inherits the parent's accelerate singletons; start from a clean state.
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator = Accelerator(cpu=True)
    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=seed)
    loader = accelerator.prepare(DataLoader(IndexDataset(len(GROUPS)), batch_sampler=sampler))
    seen = {}
    for epoch in range(2):
        sampler.set_epoch(epoch)
        seen[epoch] = [batch.tolist() for batch in loader]
    record = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "pid": os.getpid(),
        "batches": seen,
    }
    with open(os.path.join(out_dir, f"rank{accelerator.process_index}.json"), "w") as f:
        json.dump(record, f)


def test_accelerate_two_processes_keep_batches_homogeneous(tmp_path):
    from accelerate import debug_launcher

    seed = 11
    debug_launcher(_record_accelerate_batches, args=(str(tmp_path), seed), num_processes=2)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in records] == [0, 1]
    assert all(r["num_processes"] == 2 for r in records)
    assert len({records[0]["pid"], records[1]["pid"], os.getpid()}) == 3

    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=seed)
    for epoch in range(2):
        expected = batches_of(sampler, epoch)  # 7 batches: odd, so accelerate pads rank 1 by one
        rank0, rank1 = (r["batches"][str(epoch)] for r in records)
        assert len(rank0) == len(rank1) == 4
        # whole batches round-robin; the padding replays the epoch's first batch
        assert rank0 == expected[0::2]
        assert rank1 == expected[1::2] + [expected[0]]
        assert all(len(b) == BATCH_SIZE and len({GROUPS[i] for i in b}) == 1 for b in rank0 + rank1)
    assert records[0]["batches"]["0"] != records[0]["batches"]["1"]


def test_repeats_oversample_chosen_samples_within_their_group():
    """``repeats`` (lesion slices, ``data.lesion_oversample``): a sample comes that many times per epoch
    (plus at most one padding duplicate), always in batches of its own group."""
    repeats = np.where(np.arange(len(GROUPS)) % 3 == 0, 3, 1)
    sampler = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=1, repeats=repeats)
    for epoch in range(3):
        batches = batches_of(sampler, epoch)
        assert all(len(b) == BATCH_SIZE and len({GROUPS[i] for i in b}) == 1 for b in batches)
        counts = Counter(i for b in batches for i in b)
        entries = Counter()  # a group's entries: its members, each as often as it repeats
        for i, key in enumerate(GROUPS):
            entries[key] += repeats[i]
        assert all(counts[i] >= repeats[i] for i in range(len(GROUPS)))
        # padding draws from the group's entries: at most one more round where the group fills a batch
        assert all(counts[i] <= 2 * repeats[i] for i in range(len(GROUPS)) if entries[GROUPS[i]] >= BATCH_SIZE)
        assert sum(counts.values()) == sum(-(-n // BATCH_SIZE) * BATCH_SIZE for n in entries.values())
    plain = ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, seed=1)
    assert len(sampler) > len(plain)
    for bad in ([2] * (len(GROUPS) - 1), [0] + [1] * (len(GROUPS) - 1)):
        with pytest.raises(ValueError, match="repeats"):
            ModalityConsistentBatchSampler(GROUPS, BATCH_SIZE, repeats=bad)
