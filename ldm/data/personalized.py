"""A few photos of one concept, each paired with a caption made from its base class word (CatVersion's training set);
several concepts trained in one run (`Concepts`)."""
import os
import random
import warnings

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset, default_collate

from ldm.images import UnreadableImage, list_images, load_rgb

INTERPOLATIONS = {"linear": Image.Resampling.BILINEAR,
                  **{name: Image.Resampling[name.upper()] for name in ("bilinear", "bicubic", "lanczos", "nearest")}}


class PersonalizedBase(Dataset):
    """The reference's dataset, with the caption built from `base_class_word` through `templates`. Unreadable images
    are skipped with a warning naming them (a corrupt file among good ones should not cost a run)."""

    takes_item_seeds = True  # __getitem__ takes ResumableSampler's `(index, item_seed)` keys

    # **ignored: reference keys that CatVersion does not use (per_image_tokens, mixing_prob, coarse_class_text)
    def __init__(self, data_root, size=None, repeats=100, interpolation="bicubic", flip_p=0.5, set="train",
                 center_crop=False, base_class_word=None, templates=("{}",), placeholder_token=None, **ignored):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {interpolation!r}; use one of {sorted(INTERPOLATIONS)}")
        word = base_class_word or placeholder_token
        if not word:
            raise ValueError("no base class word; pass --init_word WORD (e.g. teddybear) naming the kind of thing your concept is")
        self.images, bad = [], []
        for path in list_images(data_root).values():
            try:
                self.images.append(load_rgb(path))
            except UnreadableImage as e:
                bad.append(f"{os.path.basename(path)} ({e.kind})")
        if bad:
            warnings.warn(f"skipping unreadable images in {data_root}: {', '.join(bad)}")
        if not self.images:
            raise ValueError(f"none of the images in {data_root} could be read; replace them with ordinary JPEG or PNG files")
        self.captions = [t.format(word) for t in templates]
        self.size, self.flip_p, self.center_crop = size, flip_p, center_crop
        self.interpolation = INTERPOLATIONS[interpolation]
        self.num_images = len(self.images)
        self._length = self.num_images * repeats if set == "train" else self.num_images

    def __len__(self):
        return self._length

    def prepare(self, i, flip):
        """Image i as (size, size, 3) floats in [-1, 1], resized like the reference (whole image, or centre crop first)."""
        img = self.images[i % self.num_images]
        if self.center_crop:
            w, h = img.size
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2))
        if self.size is not None:
            img = img.resize((self.size, self.size), resample=self.interpolation)
        if flip:
            img = ImageOps.mirror(img)
        return (np.asarray(img, dtype=np.float32) / 127.5 - 1.0)

    def __getitem__(self, key):
        """Item `key`: an index, or `(index, item_seed)` as `ResumableSampler` yields them. As in the reference, the
        picture is mirrored with probability flip_p and gets a caption drawn uniformly from the templates; with an
        `item_seed` both draws come from `random.Random(item_seed)`, not (as in the authors' code and for a plain index)
        from the process's global streams: the same distribution, but an item's draws no longer depend on which
        DataLoader worker loads it, or when, so a resumed run sees exactly the items an uninterrupted one would have."""
        i, item_seed = key if isinstance(key, tuple) else (key, None)
        rng = random if item_seed is None else random.Random(item_seed)
        flip = rng.random() < self.flip_p
        # `index` names the picture: a trainer may cache its VAE latents per (index, flip) (LatentDiffusion's fast path)
        return {"image": self.prepare(i, flip), "caption": rng.choice(self.captions), "index": i % self.num_images,
                "flip": flip}


def concept_names(data_roots, words):
    """{data folder name: base class word} of a run's concepts, checked: one word per folder, each folder once (its
    name names the concept's `checkpoints/<name>/`)."""
    data_roots, words = list(data_roots), [words] if isinstance(words, str) or words is None else list(words)
    if len(words) != len(data_roots):
        raise ValueError(f"{len(data_roots)} concept folders (--data_root) but {len(words)} base class words (--init_word); "
                         "give one word per folder, in the same order")
    names = {}
    for root in data_roots:
        name = os.path.basename(os.path.normpath(root))
        if name in names:
            same = os.path.realpath(root) == os.path.realpath(names[name])
            raise ValueError(f"--data_root {names[name]} and {root} " + ("are the same folder; give each concept once" if same else
                             f"share the folder name {name!r}, which names the concept's checkpoints/{name}/; rename one"))
        names[name] = root
    return dict(zip(names, (str(w) for w in words)))


class Concepts(Dataset):
    """Several concepts' datasets as one: item i is item i of each (the shorter ones wrap around), so a batch of `b`
    items, put together by `collate`, holds `b` pictures of every concept, concept after concept, each with its
    concept's index (`concept`) and an `index` unique across concepts (the trainer's latent cache keys)."""

    takes_item_seeds = True

    def __init__(self, datasets):
        self.datasets = datasets
        self.offsets = np.cumsum([0] + [d.num_images for d in datasets]).tolist()

    def __len__(self):
        return max(len(d) for d in self.datasets)

    def __getitem__(self, key):
        i, seed = key if isinstance(key, tuple) else (key, None)
        # Each concept draws its flip and caption from its own seed: the same one for all would flip them together.
        return [{**item, "index": self.offsets[c] + item["index"], "concept": c}
                for c, d in enumerate(self.datasets)
                for item in [d[(i % len(d), None if seed is None else f"{seed}:{c}")]]]

    @staticmethod
    def collate(items):
        return default_collate([group[c] for c in range(len(items[0])) for group in items])
