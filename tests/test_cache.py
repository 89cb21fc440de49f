"""The slice cache's format has one owner (mmdiff.data.cache): names made safe, ids, fingerprint."""

import shutil

import pytest

from conftest import write_layout
from mmdiff.data.cache import (CacheError, case_dir, dataset_id, describe, fingerprint, read_index, safe_name)
from mmdiff.data.dataset import SliceDataset
from mmdiff.data.layouts import scan
from mmdiff.data.prepare import PrepareConfig, prepare
from mmdiff.evaluation.downstream import load_segmentation_cases
from mmdiff.evaluation.protocol import load_cases

SPLITS = ["train", "val", "test"]


@pytest.fixture(scope="module")
def odd_names(tmp_path_factory):
    """A cache whose dataset name is not a safe folder name ("BraTS 2018 / site A")."""
    root = tmp_path_factory.mktemp("odd")
    write_layout(root / "src", "brats2018", n_cases=3)
    prepare(scan(root / "src", dataset="BraTS 2018 / site A"), root / "cache", PrepareConfig(size=32, spacing=2.0),
            progress=False)
    return root / "cache"


def test_every_reader_finds_cases_whose_names_were_made_safe(odd_names):
    name = "BraTS 2018 / site A"
    assert safe_name(name) == "BraTS_2018_site_A"
    index = read_index(odd_names)
    assert index["datasets"] == [name]
    for entry in index["cases"]:
        assert (odd_names / entry["path"]) == case_dir(odd_names, name, entry["case_id"])
        assert case_dir(odd_names, name, entry["case_id"]).parent.name == "BraTS_2018_site_A"
    assert len(list(load_cases(odd_names, SPLITS, datasets=[name]))) == 3
    labelled = load_segmentation_cases(odd_names, SPLITS, dataset=name)  # built the case path by hand before
    assert len(labelled) == 3 and all(labels.max() > 0 for _, labels in labelled)
    assert len(SliceDataset(odd_names, split=SPLITS)) > 0


def test_dataset_ids_are_positions_in_the_cache_list(odd_names):
    assert dataset_id(["a", "b"], "b") == 1
    with pytest.raises(CacheError, match=r"dataset 'c' is not in this cache \(it has \['a', 'b'\]\)"):
        dataset_id(["a", "b"], "c")
    dataset = SliceDataset(odd_names, split=SPLITS)
    assert set(dataset.dataset_ids.tolist()) == {0} and dataset[0]["dataset_id"] == 0


def test_fingerprint_identifies_the_data_not_the_folder(odd_names, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(odd_names, moved)
    assert fingerprint(moved) == fingerprint(odd_names)
    described = describe(moved)
    assert str(moved) not in str(described) and str(odd_names) not in str(described)
    (site,) = described["datasets"].values()
    assert site["cases"] == 3 and sum(site["splits"].values()) == 3 and site["labelled"] == 3
    assert site["modalities"] == {"t1": 3, "t2": 3, "t1c": 3, "flair": 3}
    assert described["preparation"]["clip_percentile"] == 99.5
    # the held-out cases by name, as the index splits them
    held = {s: sorted(c["case_id"] for c in read_index(moved)["cases"] if c["split"] == s) for s in ("val", "test")}
    assert site["held_out"] == held and len(held["val"]) + len(held["test"]) == 3 - site["splits"]["train"]
    # another split of the same cases is other data
    index_path = moved / "index.json"
    text = index_path.read_text()
    index_path.write_text(text.replace('"split": "train"', '"split": "val"', 1))
    assert fingerprint(moved) != fingerprint(odd_names)


def test_a_folder_that_is_not_a_cache_says_what_to_do(tmp_path):
    with pytest.raises(CacheError, match="is not a prepared cache \\(no index.json\\): run `mmdiff prepare` first"):
        read_index(tmp_path)


def test_a_cache_of_an_older_format_is_refused_with_what_changed(odd_names, tmp_path):
    """A format-1 cache (its WML lesions stored as 255) is never read as if current: every reader and
    prepare say what changed and what to do, and the old cache is left as it was."""
    import json

    from mmdiff.data.cache import CACHE_JSON, CACHE_FORMAT, read_info

    old = tmp_path / "old"
    shutil.copytree(odd_names, old)
    info = json.loads((old / CACHE_JSON).read_text())
    assert info["format"] == CACHE_FORMAT == 2
    (old / CACHE_JSON).write_text(json.dumps({**info, "format": 1}))
    before = sorted(p.relative_to(old) for p in old.rglob("*"))
    for read in (read_info, read_index, lambda c: SliceDataset(c, split=SPLITS), lambda c: list(load_cases(c, SPLITS))):
        with pytest.raises(CacheError, match="format 1.*255.*prepare the sources again"):
            read(old)
    with pytest.raises(CacheError, match="format 1"):
        prepare([], old, PrepareConfig(size=32, spacing=2.0), progress=False)
    assert sorted(p.relative_to(old) for p in old.rglob("*")) == before
    (old / CACHE_JSON).write_text(json.dumps({**info, "format": CACHE_FORMAT + 1}))
    with pytest.raises(CacheError, match="newer mmdiff"):
        read_index(old)
