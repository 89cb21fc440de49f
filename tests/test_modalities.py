import numpy as np
import pytest

from mmdiff.modalities import (MODALITIES, UnknownModalityError, availability, canonical, mask_key, names,
                               parse_mask_key)


def test_fixed_order():
    assert MODALITIES == ("t1", "t2", "t1c", "flair", "dwi", "adc")


@pytest.mark.parametrize("alias,expected", [
    ("T1n", "t1"), ("t1w", "t1"), ("T1CE", "t1c"), ("t1gd", "t1c"), ("t1post", "t1c"), ("T2W", "t2"),
    ("t2f", "flair"), ("FLAIR", "flair"), ("trace", "dwi"), ("ADC", "adc"), ("-t1c", "t1c"),
])
def test_aliases(alias, expected):
    assert canonical(alias) == expected


def test_unknown_modality_lists_known_ones():
    with pytest.raises(UnknownModalityError) as err:
        canonical("pd")
    message = str(err.value)
    assert "'pd'" in message and all(m in message for m in MODALITIES) and "t1ce" in message


def test_other_modality_list():
    assert canonical("pd", modalities=("t1", "pd")) == "pd"
    with pytest.raises(UnknownModalityError):
        canonical("flair", modalities=("t1", "pd"))


def test_masks_round_trip():
    mask = availability(["flair", "T1ce", "t1"])
    assert mask.tolist() == [True, False, True, True, False, False]
    assert names(mask) == ["t1", "t1c", "flair"]
    assert mask_key(mask) == "101100"
    np.testing.assert_array_equal(parse_mask_key("101100"), mask)
    with pytest.raises(ValueError):
        parse_mask_key("10x")
