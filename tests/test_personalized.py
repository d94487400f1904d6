import numpy as np
import pytest

from ldm.data.personalized import PersonalizedBase


def test_captions_sizes_and_range(example_data):
    ds = PersonalizedBase(example_data, size=32, repeats=3, base_class_word="circle", flip_p=0.0)
    assert len(ds) == 15
    item = ds[7]
    assert item["caption"] == "circle"
    assert item["image"].shape == (32, 32, 3) and item["image"].dtype == np.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    ds2 = PersonalizedBase(example_data, size=32, base_class_word="circle", templates=["a photo of a {}"], set="val")
    assert len(ds2) == 5 and ds2[0]["caption"] == "a photo of a circle"


def test_flip_mirrors(tmp_path):
    # Noise, not the example circles: a mirror-symmetric picture equals its own mirror image whether flipped or not.
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    ds = PersonalizedBase(str(tmp_path), size=32, base_class_word="circle")
    expected = pixels.astype(np.float32) / 127.5 - 1
    assert np.array_equal(ds.prepare(0, flip=False), expected)
    assert np.array_equal(ds.prepare(0, flip=True), expected[:, ::-1])


def test_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="image folder not found: .*; pass a folder of .jpg"):
        PersonalizedBase(str(tmp_path / "nope"), base_class_word="x")
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no images \(.jpg, .jpeg, .png, .webp\) in"):
        PersonalizedBase(str(tmp_path), base_class_word="x")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(ValueError, match="none of the images in .* could be read"):
        PersonalizedBase(str(tmp_path), base_class_word="x")
    with pytest.raises(ValueError, match="no base class word; pass --init_word"):
        PersonalizedBase(str(tmp_path), base_class_word=None)


def test_corrupt_image_among_good_ones_is_skipped_with_warning(example_data, tmp_path):
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(example_data, folder)
    good = (folder / "00.png").read_bytes()
    (folder / "zz_truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.warns(UserWarning, match="skipping unreadable images .*zz_truncated.png"):
        ds = PersonalizedBase(str(folder), base_class_word="circle", size=16)
    assert ds.num_images == 5


def test_image_over_the_decompression_bomb_limit_is_skipped(example_data, tmp_path):
    """A 200-megapixel PNG (a header is enough for PIL to refuse it) is skipped with a warning, like a corrupt file."""
    import shutil

    from .test_bad_inputs import save_png_header_only

    folder = tmp_path / "bomb"
    shutil.copytree(example_data, folder)
    save_png_header_only(folder / "huge.png", 20000, 10000)
    with pytest.warns(UserWarning, match=r"skipping unreadable images .*huge.png \(DecompressionBombError\)"):
        ds = PersonalizedBase(str(folder), base_class_word="circle", size=16)
    assert ds.num_images == 5


def test_center_crop_takes_the_reference_s_centre_square_then_resizes(tmp_path):
    """center_crop against the LDM dataset's numpy slice `img[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2]`."""
    from PIL import Image

    pixels = np.random.default_rng(1).integers(0, 256, (21, 36, 3), dtype=np.uint8)  # odd margins: 15 // 2 = 7
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    ds = PersonalizedBase(str(tmp_path), size=16, base_class_word="circle", center_crop=True)
    h, w, c = 21, 36, 21
    square = Image.fromarray(pixels[(h - c) // 2:(h + c) // 2, (w - c) // 2:(w + c) // 2])
    expected = np.asarray(square.resize((16, 16), resample=Image.Resampling.BICUBIC), dtype=np.float32) / 127.5 - 1
    assert np.array_equal(ds.prepare(0, flip=False), expected)
    uncropped = PersonalizedBase(str(tmp_path), size=16, base_class_word="circle").prepare(0, flip=False)
    assert not np.allclose(uncropped, expected, atol=0.1)  # the whole picture squeezed is another picture


def test_unknown_interpolation_is_refused_with_the_choices(example_data):
    with pytest.raises(ValueError, match=r"unknown interpolation 'cubic'; use one of \['bicubic', "):
        PersonalizedBase(example_data, interpolation="cubic", base_class_word="circle")
