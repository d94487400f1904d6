"""ldm/images.py: the one image lister and reader, and training and evaluation reading the same pixels through it."""
import numpy as np
import pytest
from PIL import Image

from ldm.data.personalized import PersonalizedBase
from ldm.evaluation import clip_metrics
from ldm.images import UnreadableImage, list_images, load_grey, load_rgb
from ldm.cli import evaluate


def _exif_rotated():
    """40 wide x 20 high, red left half, blue right half, EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:] = (255, 0, 0), (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    return Image.fromarray(pixels), {"exif": exif, "quality": 95}


def _palette_with_transparency():
    """A palette image whose right half is the palette's transparent colour (green, which must not show)."""
    rgb = Image.new("RGB", (16, 8), (10, 20, 200))
    rgb.paste((0, 255, 0), (8, 0, 16, 8))
    image = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return image, {"transparency": image.getpixel((12, 4))}


def _half_transparent(mode):
    """Opaque red (or grey) left half; the right half fully transparent with a colour that must not show."""
    pixels = np.zeros((8, 16, 4), np.uint8)
    pixels[:, :8], pixels[:, 8:] = (255, 0, 0, 255), (0, 255, 0, 0)
    return Image.fromarray(pixels).convert(mode), {}


# 16-bit values whose 8-bit value rounds up (15620 / 257 = 60.8 -> 61): truncating would give 60.
GREY16 = np.tile(np.array([0, 15620, 257 * 200 + 200, 65535], np.uint16), (4, 1))

ODD_FILES = {  # name: (image, save options, what load_rgb must make of it)
    "rgba.png": (*_half_transparent("RGBA"), lambda px: px[0, 0].tolist() == [255, 0, 0] and px[0, 15].tolist() == [255] * 3),
    "la.png": (*_half_transparent("LA"), lambda px: px[0, 0].tolist() == [76] * 3 and px[0, 15].tolist() == [255] * 3),
    "palette.png": (*_palette_with_transparency(),
                    lambda px: px[4, 3].tolist() == [10, 20, 200] and px[4, 12].tolist() == [255] * 3),
    "grey16.png": (Image.fromarray(GREY16), {}, lambda px: px[0, :, 0].tolist() == [0, 61, 201, 255]),
    "exif.jpg": (*_exif_rotated(), lambda px: px.shape == (40, 20, 3) and px[5, 10, 0] > 180 and px[35, 10, 2] > 180),
    "cmyk.jpg": (Image.new("RGB", (8, 8), (200, 100, 50)).convert("CMYK"), {"quality": 95},
                 lambda px: np.abs(px.astype(int) - (200, 100, 50)).max() <= 8),
}


@pytest.fixture
def odd_folder(tmp_path):
    folder = tmp_path / "odd"
    folder.mkdir()
    for name, (image, options, _) in ODD_FILES.items():
        image.save(folder / name, **options)
    return folder


@pytest.mark.parametrize("name", list(ODD_FILES))
def test_any_mode_is_read_as_the_rgb_a_viewer_shows(name, odd_folder):
    image = load_rgb(odd_folder / name)
    assert image.mode == "RGB" and ODD_FILES[name][2](np.asarray(image))


def test_training_and_evaluation_read_the_same_pixels(odd_folder, tmp_path, monkeypatch):
    """The training set (PersonalizedBase, before its resize) and scripts/evaluate.py (the images it hands to the
    metrics, before CLIP's preprocessing) get identical pixels from the same odd files."""
    training = PersonalizedBase(str(odd_folder), base_class_word="x")
    seen = {}

    class Captured(Exception):
        pass

    def capture(clip, ref_images, gen_images, *rest):
        seen.update(ref=ref_images, gen=gen_images)
        raise Captured

    monkeypatch.setattr(clip_metrics, "load_clip", lambda *args: None)
    monkeypatch.setattr(clip_metrics, "compute_metrics", capture)
    args = evaluate.parse_args(["--ref_dir", str(odd_folder), "--gen_dir", str(odd_folder), "--prompt", "x",
                                "--clip_weights", "unused.bin", "--out", str(tmp_path / "scores.json")])
    with pytest.raises(Captured):
        evaluate.run(args)
    assert list(seen["ref"]) == [name.rsplit(".", 1)[0] for name in sorted(ODD_FILES)]
    for i, (stem, evaluated) in enumerate(seen["ref"].items()):
        trained = training.images[i]
        assert (trained.mode, trained.size) == (evaluated.mode, evaluated.size) == ("RGB", trained.size), stem
        assert np.array_equal(np.asarray(trained), np.asarray(evaluated)), stem
        assert np.array_equal(np.asarray(seen["gen"][stem]), np.asarray(evaluated)), stem


def test_masks_are_read_as_grey_upright_and_scaled(tmp_path):
    image, options = _exif_rotated()
    image.save(tmp_path / "m.jpg", **options)
    Image.fromarray(GREY16).save(tmp_path / "g.png")
    assert load_grey(tmp_path / "m.jpg").size == (20, 40)
    assert np.asarray(load_grey(tmp_path / "g.png"))[0].tolist() == [0, 61, 201, 255]


def test_list_images_by_stem_sorted_skipping_hidden_and_other_files(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp", ".hidden.png", "notes.txt", "clip.mp4"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "d.png").mkdir()  # a folder with an image's name
    assert list_images(tmp_path) == {s: str(tmp_path / n) for s, n in (("a", "a.jpg"), ("b", "b.PNG"), ("c", "c.webp"))}
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ValueError, match=f"^a.jpg and a.png in {tmp_path} share a stem; rename one$"):
        list_images(tmp_path)


def test_list_images_errors_name_folder_and_fix(tmp_path):
    with pytest.raises(ValueError, match=f"^image folder not found: {tmp_path / 'nope'}; pass a folder of .jpg"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match=rf"^no images \(.jpg, .jpeg, .png, .webp\) in {tmp_path}; put the images there$"):
        list_images(tmp_path)


def test_unreadable_image_is_one_line_naming_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(UnreadableImage) as e:
        load_rgb(tmp_path / "broken.png")
    assert str(e.value).startswith(f"cannot read image {tmp_path / 'broken.png'} (") and "\n" not in str(e.value)
    assert str(e.value).endswith("; replace or remove the file") and e.value.kind in ("OSError", "UnidentifiedImageError")
