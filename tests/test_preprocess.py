"""Reading, canonical orientation, resampling and windowing, checked against SimpleITK's geometry."""
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pytest
import SimpleITK as sitk

from tests.conftest import shared_path
from tests.volumes import image_from_xyz, reoriented_copy, write_bad_inputs
from volmae.volumes.orientation import CANONICAL_ORIENTATION, orientation_code, to_canonical
from volmae.volumes.preprocess import PreprocessConfig, load_volume, preprocess_image, resample_to_grid
from volmae.volumes.reading import VolumeReadError, listed_path, listed_source, read_image, unreadable_reason
from volmae.volumes.sources import list_sources

pytestmark = pytest.mark.fast  # in-process: `make test-fast`


@pytest.mark.parametrize("perm,flips", [((2, 0, 1), (True, False, True)), ((1, 0, 2), (False, True, False)),
                                        ((0, 1, 2), (True, True, True))])
def test_same_physical_image_gives_the_same_array_whatever_its_axis_order(perm, flips):
    image = read_image(str(shared_path("volumes", "example_ct_sm.nii.gz")))
    copy = reoriented_copy(image, perm, flips)
    rng = np.random.default_rng(0)
    for _ in range(20):  # the copy really is the same physical image, by SimpleITK's own transforms
        index = [int(rng.integers(0, s)) for s in copy.GetSize()]
        point = copy.TransformIndexToPhysicalPoint(index)
        original_index = image.TransformPhysicalPointToIndex(point)
        assert copy[index] == image[original_index]
    assert orientation_code(copy) != orientation_code(image) or perm == (0, 1, 2)
    config = PreprocessConfig(size=(24, 32, 40))
    np.testing.assert_array_equal(preprocess_image(copy, config).array, preprocess_image(image, config).array)


def test_canonical_array_axes_run_superior_posterior_left():
    """A bright voxel placed at a known anatomical side lands on that side of the (D, H, W) array."""
    data = np.zeros((20, 20, 20), np.float32)
    data[15, 10, 10] = 1000  # +x in a RAS-stored NIfTI is the patient's right
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    image = image_from_xyz(data, direction=ras_to_lps)  # index x grows toward the patient's Right
    canonical = to_canonical(image)
    assert orientation_code(canonical) == CANONICAL_ORIENTATION
    array = sitk.GetArrayFromImage(canonical)
    d, h, w = np.unravel_index(np.argmax(array), array.shape)
    assert w < 10  # W runs right -> left, so the patient's right is at small W


def bright_spot_image() -> tuple[sitk.Image, tuple[float, float, float]]:
    """An anisotropic, permuted-axis image with a 3-voxel bright cube at a known physical point."""
    data = np.full((30, 40, 24), -1000.0, np.float32)
    data[19:22, 9:12, 15:18] = 2000.0
    direction = np.array([[0, 1, 0], [0, 0, -1], [1, 0, 0]], float)
    image = image_from_xyz(data, spacing=(1.5, 0.8, 2.5), origin=(-20.0, 13.0, 40.0), direction=direction)
    return image, image.TransformIndexToPhysicalPoint([20, 10, 16])


@pytest.mark.parametrize("mode,spacing", [("fit", None), ("stretch", None), ("spacing", (2.5, 2.0, 2.2))])
def test_resampling_keeps_physical_positions(mode, spacing):
    image, point = bright_spot_image()
    config = PreprocessConfig(size=(20, 24, 28), resample=mode, spacing=spacing, modality="ct")
    resampled = resample_to_grid(to_canonical(image), config, -1024.0)
    assert orientation_code(resampled) == CANONICAL_ORIENTATION
    assert resampled.GetSize() == (28, 24, 20)
    array = sitk.GetArrayFromImage(resampled)  # z, y, x
    weights = np.clip(array - array.max() / 2, 0, None)
    centroid_zyx = np.array([(weights.sum(axis=tuple(a for a in range(3) if a != k)) * np.arange(n)).sum()
                             for k, n in enumerate(array.shape)]) / weights.sum()
    expected_xyz = np.array(resampled.TransformPhysicalPointToContinuousIndex(point))
    np.testing.assert_allclose(centroid_zyx[::-1], expected_xyz, atol=0.5)
    out_spacing = np.array(resampled.GetSpacing())
    if mode == "fit":
        assert np.allclose(out_spacing, out_spacing[0])
    if mode == "spacing":
        np.testing.assert_allclose(out_spacing, spacing[::-1])
    np.testing.assert_array_equal(preprocess_image(image, config).array.shape, (1, 20, 24, 28))


def test_ct_window_maps_hu_and_pads_with_air_not_water():
    data = np.zeros((16, 16, 8), np.float32)
    data[:, :, 0:2] = -1000
    data[:, :, 2:4] = 0
    data[:, :, 4:6] = 1000
    data[:, :, 6:8] = 2500
    image = image_from_xyz(data, spacing=(2.0, 2.0, 4.0))  # 32 x 32 x 32 mm: fits the grid exactly
    out = preprocess_image(image, PreprocessConfig(size=(8, 16, 16), modality="ct")).array[0]
    np.testing.assert_allclose(out[[0, 2, 4, 6], 8, 8], [0.0, 0.5, 1.0, 1.0], atol=1e-6)
    body = np.full((16, 8, 8), 40.0, np.float32)
    body[0, 0, 0] = 60.0
    wide = image_from_xyz(body, spacing=(2.0, 2.0, 2.0))
    padded = preprocess_image(wide, PreprocessConfig(size=(16, 16, 16), modality="ct")).array[0]
    assert padded[8, 0, 8] == 0.0  # padded rows hold air (-1024 HU -> 0), not 0 HU (0.5)
    assert padded[8, 8, 8] == pytest.approx(0.52)


def test_mr_is_windowed_by_its_percentiles():
    values = np.random.default_rng(0).gamma(2.0, 100.0, size=(20, 20, 20)).astype(np.float32)
    image = image_from_xyz(values)
    result = preprocess_image(image, PreprocessConfig(size=(20, 20, 20)))
    assert result.modality == "mr"
    low, high = np.percentile(values, [0.5, 99.5])
    assert result.intensity_range == pytest.approx((low, high), rel=1e-5)
    out = result.array[0]
    assert out.min() == 0.0 and out.max() == 1.0
    assert np.mean(out == 1.0) == pytest.approx(0.005, abs=0.003)


def test_ct_window_presets_and_auto_modality():
    ct = read_image(str(shared_path("volumes", "example_ct_sm.nii.gz")))
    assert preprocess_image(ct, PreprocessConfig(size=(8, 8, 8))).modality == "ct"
    lung = preprocess_image(ct, PreprocessConfig(size=(8, 8, 8), ct_window=(-1350, 150)))
    assert lung.intensity_range == (-1350.0, 150.0)
    dicom = read_image(str(shared_path("volumes", "example_ct_dicom")))
    assert dicom.GetMetaData("0008|0060") == "CT"


def test_every_shared_volume_reads_including_the_dicom_series():
    folder = shared_path("volumes")
    sources = list_sources(folder)
    assert len(sources) == 7 and str(folder / "example_ct_dicom") in sources
    for source in sources:
        volume = load_volume(source, PreprocessConfig(size=(16, 16, 16)))
        assert volume.shape == (1, 16, 16, 16) and volume.dtype == np.float32
        assert 0.0 <= volume.min() and volume.max() <= 1.0 and volume.max() > 0.0


def test_4d_input_contributes_its_first_frame_with_a_warning(caplog):
    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    image = read_image(str(path))
    assert image.GetDimension() == 3
    assert "4-D image" in caplog.text and "using the first" in caplog.text
    frames = nibabel.load(path).get_fdata()
    np.testing.assert_allclose(sitk.GetArrayFromImage(image).transpose(2, 1, 0), frames[..., 0])


def test_analyze_pairs_as_spm_writes_them_read_like_the_same_voxels_in_mha(tmp_path, capfd):
    """An Analyze 7.5 .hdr/.img pair (written by nibabel, as SPM's PET output is) is listed once, by its header,
    and preprocesses to the array of the same voxels written by SimpleITK as MHA (Analyze has no orientation:
    identity directions), quietly; a header without its .img is refused with that reason."""
    rng = np.random.default_rng(0)
    xyz = rng.normal(size=(9, 11, 7)).astype(np.float32)
    xyz[:3, :4, :2] += 5.0  # asymmetric along every axis
    nibabel.save(nibabel.AnalyzeImage(xyz, np.diag([2.0, 2.5, 3.0, 1.0])), tmp_path / "pet.hdr")
    reference = image_from_xyz(xyz, spacing=(2.0, 2.5, 3.0))
    sitk.WriteImage(reference, str(tmp_path / "same.mha"))
    assert list_sources(tmp_path) == [str(tmp_path / "pet.hdr"), str(tmp_path / "same.mha")]
    image = read_image(str(tmp_path / "pet.hdr"))
    assert image.GetSpacing() == (2.0, 2.5, 3.0)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image).transpose(2, 1, 0), xyz)
    config = PreprocessConfig(size=(8, 12, 10), resample="spacing", spacing=(2.0, 2.0, 2.0), modality="mr")
    np.testing.assert_array_equal(load_volume(str(tmp_path / "pet.hdr"), config), load_volume(str(tmp_path / "same.mha"), config))
    assert "deprecated" not in capfd.readouterr().err
    (tmp_path / "pet.img").unlink()
    assert unreadable_reason(str(tmp_path / "pet.hdr")) == "an Analyze header without its data file pet.img beside it"


def test_each_kind_of_broken_file_is_refused_with_its_reason(tmp_path, phantom_dir):
    good = sorted(phantom_dir.glob("*.nii.gz"))[0]
    expected = write_bad_inputs(tmp_path, good)
    for name, fragment in expected.items():
        reason = unreadable_reason(str(tmp_path / name))
        if reason is None:  # only the header is checked; the data check happens on reading
            with pytest.raises(ValueError, match=fragment):
                load_volume(str(tmp_path / name), PreprocessConfig(size=(8, 8, 8)))
        else:
            assert fragment in reason, (name, reason)
    shutil.copy(good, tmp_path / "good.nii.gz")
    assert unreadable_reason(str(tmp_path / "good.nii.gz")) is None


def write_detached(header: Path, data_file: str, kind: str = "mhd", size=(6, 5, 4), element: str = "MET_SHORT") -> None:
    """A MetaImage (.mhd) or detached NRRD (.nhdr) header that names `data_file`."""
    if kind == "mhd":
        header.write_text(f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, size))}\n"
                          f"ElementType = {element}\nElementSpacing = 1 1 1\nElementDataFile = {data_file}\n")
    else:
        header.write_text(f"NRRD0004\ntype: short\ndimension: 3\nsizes: {' '.join(map(str, size))}\n"
                          f"spacings: 1 1 1\nencoding: raw\nendian: little\ndata file: {data_file}\n")


@pytest.mark.parametrize("kind", ["mhd", "nhdr"])
def test_a_detached_header_reads_only_data_beside_it(tmp_path, kind):
    """A header may name any file as its data (/etc/passwd): only files in its own folder are read, unless
    --allow_external_data says otherwise."""
    volume = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    (tmp_path / "scans").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "scans" / "beside.raw").write_bytes(volume.tobytes())
    (tmp_path / "elsewhere" / "far.raw").write_bytes(volume.tobytes())
    cases = {"ok": "beside.raw", "up": "../elsewhere/far.raw", "abs": str(tmp_path / "elsewhere" / "far.raw"),
             "passwd": "/etc/passwd"}
    for name, data_file in cases.items():
        write_detached(tmp_path / "scans" / f"{name}.{kind}", data_file, kind)
    assert unreadable_reason(str(tmp_path / "scans" / f"ok.{kind}")) is None
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_image(str(tmp_path / "scans" / f"ok.{kind}"))), volume)
    for name in ("up", "abs", "passwd"):
        reason = unreadable_reason(str(tmp_path / "scans" / f"{name}.{kind}"))
        assert reason is not None and "outside its folder" in reason and "--allow_external_data" in reason, reason
        with pytest.raises(VolumeReadError, match="outside its folder"):
            read_image(str(tmp_path / "scans" / f"{name}.{kind}"))
    allowed = read_image(str(tmp_path / "scans" / f"up.{kind}"), external_data=True)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(allowed), volume)


def test_decoded_bytes_are_budgeted_from_the_header_before_decoding(tmp_path):
    """--max_voxels counts 4-byte voxels: a float64 header gets half as many, refused before any decoding."""
    (tmp_path / "tiny.raw").write_bytes(b"\0" * 16)  # never read: the header alone decides
    write_detached(tmp_path / "big.mhd", "tiny.raw", size=(100, 100, 60), element="MET_DOUBLE")
    write_detached(tmp_path / "small.mhd", "tiny.raw", size=(100, 100, 60), element="MET_FLOAT")
    reason = unreadable_reason(str(tmp_path / "big.mhd"), max_voxels=800_000)
    assert reason is not None and "of 8 bytes" in reason and "skipped before decoding" in reason, reason
    assert "of 8 bytes" not in (unreadable_reason(str(tmp_path / "small.mhd"), max_voxels=800_000) or "")


def test_a_listed_path_is_read_one_way_for_every_listing(tmp_path):
    """Sources lists, probe CSVs, labels CSVs, SLIViT meta CSVs and prediction cases all read a listed path
    with `listed_path`: relative to the listing's folder, the part after '::' kept apart."""
    (tmp_path / "ct").mkdir()
    assert listed_path(tmp_path, " ct/a.nii.gz ") == (tmp_path / "ct" / "a.nii.gz", "")
    assert listed_path(tmp_path, "/abs/dicom::1.2.840.5") == (Path("/abs/dicom"), "1.2.840.5")
    assert listed_path(tmp_path / "ct", "../pair.npz::second", canonical=True) == (tmp_path / "pair.npz", "second")
    assert listed_source(tmp_path, "dicom::1.2.3") == f"{tmp_path / 'dicom'}::1.2.3"
    assert listed_source(tmp_path / "ct", "../b.nii", canonical=True) == str(tmp_path / "b.nii")
