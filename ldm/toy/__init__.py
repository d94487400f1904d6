"""The toy world, a research wing the product does not import: captioned scenes, metrics without CLIP, the shaping of
the random text encoder, and the training of the shipped base model (models/toy/toy-sd.ckpt)."""
