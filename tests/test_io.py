import os

import nibabel as nib
import numpy as np
import pytest

from mmdiff.io import (SYNTHETIC_DESCRIP, OverwriteError, VolumeError, atomic_dir, is_synthetic, load_volume,
                       save_nifti, write_json, write_text)


def save_on_source_grid(vol, array, path, **kwargs):
    """What the pipelines and ``synthesize`` do: canonical array -> the input file's own grid, marked synthetic."""
    return save_nifti(vol.to_source(array), vol.source_affine, path, header=vol.header, descrip=SYNTHETIC_DESCRIP,
                      inputs=[vol.path], **kwargs)


def _save(path, data, affine):
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.mark.parametrize("axcodes_affine", [
    np.diag([-1.0, -1.0, 1.0, 1.0]),                          # LPS (BraTS)
    np.array([[0, 0, 2.0, 5], [-1.0, 0, 0, 3], [0, -1.5, 0, 1], [0, 0, 0, 1]]),  # permuted, flipped
])
def test_canonical_and_write_back_on_the_input_grid(tmp_path, axcodes_affine):
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    src = _save(tmp_path / "in.nii.gz", data, axcodes_affine)
    vol = load_volume(src)
    assert nib.aff2axcodes(vol.affine) == ("R", "A", "S")
    # the same world point has the same value in canonical and source grids
    ijk_src = np.array([1, 2, 3, 1.0])
    world = axcodes_affine @ ijk_src
    ijk_can = np.rint(np.linalg.inv(vol.affine) @ world).astype(int)[:3]
    assert vol.data[tuple(ijk_can)] == pytest.approx(data[1, 2, 3])
    out = save_on_source_grid(vol, vol.data * 2, tmp_path / "out.nii.gz")
    img = nib.load(out)
    np.testing.assert_allclose(img.get_fdata(), data * 2, rtol=1e-6)
    np.testing.assert_allclose(img.affine, axcodes_affine)
    assert img.get_data_dtype() == np.float32
    assert is_synthetic(out) and not is_synthetic(src)


def test_singleton_4d_accepted_other_4d_refused(tmp_path):
    ok = _save(tmp_path / "a.nii.gz", np.ones((4, 4, 4, 1), np.float32), np.eye(4))
    assert load_volume(ok).shape == (4, 4, 4)
    bad = _save(tmp_path / "b.nii.gz", np.ones((4, 4, 4, 3), np.float32), np.eye(4))
    with pytest.raises(VolumeError, match="3D volume"):
        load_volume(bad)


def test_nonfinite_values_become_zero(tmp_path):
    data = np.ones((4, 4, 4), np.float32)
    data[0, 0, 0], data[1, 1, 1] = np.nan, np.inf
    with pytest.warns(UserWarning, match="2 NaN/Inf"):
        vol = load_volume(_save(tmp_path / "a.nii.gz", data, np.eye(4)))
    assert vol.nonfinite == 2 and np.isfinite(vol.data).all() and vol.data[0, 0, 0] == 0


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match="cannot be read"):
        load_volume(tmp_path / "junk.nii.gz")
    with pytest.raises(VolumeError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    with pytest.raises(VolumeError, match="not a NIfTI"):
        load_volume(tmp_path)


def test_never_overwrites_inputs_or_existing_files(tmp_path):
    src = _save(tmp_path / "in.nii.gz", np.ones((3, 3, 3), np.float32), np.eye(4))
    vol = load_volume(src)
    with pytest.raises(OverwriteError, match="refusing to write .*in.nii.gz: it is an input file"):
        save_on_source_grid(vol, vol.data, src, overwrite=True)
    out = save_on_source_grid(vol, vol.data, tmp_path / "out.nii.gz")
    with pytest.raises(OverwriteError, match="out.nii.gz exists"):
        save_on_source_grid(vol, vol.data, out)
    save_on_source_grid(vol, vol.data * 3, out, overwrite=True)
    assert nib.load(out).get_fdata().max() == 3


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_folders_respect_the_umask(tmp_path, umask):
    """Atomic writes go through mkstemp/mkdtemp (0600/0700): the result must get the usual modes."""
    previous = os.umask(umask)
    try:
        nifti = save_nifti(np.ones((3, 3, 3), np.float32), np.eye(4), tmp_path / "a.nii.gz")
        sidecar = write_json(tmp_path / "a.json", {"synthetic": True})
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "x.txt").write_text("x")
    finally:
        os.umask(previous)
    for path in (nifti, sidecar):
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask, oct(path.stat().st_mode)
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~umask


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    class Boom(Exception):
        pass

    with pytest.raises(Boom):
        from mmdiff.io import atomic_path
        with atomic_path(tmp_path / "x.txt") as tmp:
            tmp.write_text("half")
            raise Boom()
    assert list(tmp_path.iterdir()) == []
    write_text(tmp_path / "x.txt", "whole")
    assert (tmp_path / "x.txt").read_text() == "whole" and len(list(tmp_path.iterdir())) == 1
