"""The one image reader: training and evaluation list the same files and read the same pixels from them.

Any PIL mode ends up as 8-bit RGB: upright by its EXIF orientation, transparent areas composited on white (as a
viewer shows them on a page, not black or whatever the hidden pixels hold), 16-bit grey scaled to 8 bits (/257,
rounded) rather than clipped to white by PIL, CMYK and grey converted.
"""
import os

import numpy as np
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")


class UnreadableImage(ValueError):
    """An image PIL cannot open or decode (one line naming file and fix); `kind` names what PIL raised."""

    def __init__(self, message, kind):
        super().__init__(message)
        self.kind = kind


def list_images(folder):
    """The image files of `folder` as {stem: path}, sorted by name; hidden and non-image files are ignored."""
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"image folder not found: {folder}; pass a folder of .jpg, .jpeg, .png or .webp images")
    images = {}
    for name in sorted(os.listdir(folder)):
        path, (stem, ext) = os.path.join(folder, name), os.path.splitext(name)
        if name.startswith(".") or ext.lower() not in IMAGE_EXTENSIONS or not os.path.isfile(path):
            continue
        if stem in images:  # images are matched by stem (masks, per-image scores)
            raise ValueError(f"{os.path.basename(images[stem])} and {name} in {folder} share a stem; rename one")
        images[stem] = path
    if not images:
        raise ValueError(f"no images (.jpg, .jpeg, .png, .webp) in {folder}; put the images there")
    return images


def load_rgb(path):
    """The image at `path` as 8-bit RGB (see the module docstring); an UnreadableImage if PIL cannot read it."""
    return _read(path, "RGB")


def load_grey(path):
    """The image at `path` as 8-bit grey ("L"), upright and 16-bit scaled like `load_rgb`, its alpha ignored (masks)."""
    return _read(path, "L")


def _read(path, mode):
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).round().clip(0, 255).astype(np.uint8))
            if mode == "RGB" and (im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)):
                im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
            return im.convert(mode)
    except Image.DecompressionBombError as err:  # over PIL's 179-megapixel limit
        raise UnreadableImage(f"{path} is too large to open safely ({err}); downscale it", type(err).__name__) from None
    except (OSError, SyntaxError, ValueError) as err:  # what PIL raises for corrupt, truncated or unknown files
        reason = str(err).splitlines()[0][:120] if str(err) else type(err).__name__
        raise UnreadableImage(f"cannot read image {path} ({reason}); replace or remove the file",
                              type(err).__name__) from None
