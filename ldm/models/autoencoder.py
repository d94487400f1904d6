"""The SD v1 KL autoencoder (first stage): images <-> 4-channel latents, inference only.

The reference class is a Lightning module with its training losses and GAN discriminator; SD keeps it frozen,
so this is a plain nn.Module with the same constructor and state-dict keys, and the loss config is ignored.
"""
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.weights import read_tensors

# ddconfig values of the SD v1 VAE that the reference lets vary and this VAE does not build otherwise.
SD_V1_VAE = {"attn_resolutions": [], "resamp_with_conv": True, "double_z": True}


class AutoencoderKL(nn.Module):
    """`lossconfig`, `image_key` and `monitor` are accepted for config compatibility and unused (no training here)."""

    def __init__(self, ddconfig, lossconfig=None, embed_dim=4, ckpt_path=None, ignore_keys=(), image_key="image",
                 colorize_nlabels=None, monitor=None):
        super().__init__()
        if colorize_nlabels is not None:
            raise ValueError("colorize_nlabels is for segmentation autoencoders, not SD's; remove it from the config")
        for key, expected in SD_V1_VAE.items():
            if ddconfig.get(key, expected) != expected:
                raise ValueError(f"AutoencoderKL: ddconfig.{key}={ddconfig[key]} is not supported (only the SD v1 "
                                 f"VAE is); use {key}: {str(expected).lower()}")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
        self.embed_dim = embed_dim
        if ckpt_path is not None:
            # A standalone VAE checkpoint (keys without prefix); its training-loss weights are dropped.
            state = {k: v for k, v in read_tensors(ckpt_path).items()
                     if not k.startswith("loss.") and not any(k.startswith(p) for p in ignore_keys)}
            missing, unexpected = self.load_state_dict(state, strict=False)
            if missing or unexpected:
                raise ValueError(f"{ckpt_path} does not fit AutoencoderKL ({len(missing)} missing keys, e.g. "
                                 f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}); pass a VAE "
                                 "checkpoint made for this ddconfig")

    def encode(self, x):
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        return self.decoder(self.post_quant_conv(z))

    def forward(self, input, sample_posterior=True, generator=None):
        posterior = self.encode(input)
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior
