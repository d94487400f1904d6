"""The diagonal Gaussian posterior q(z | x) that the KL autoencoder's encoder outputs."""
import torch


class DiagonalGaussianDistribution:
    """Built from encoder moments (b, 2c, h, w): the first c channels are the mean, the last c the log-variance."""

    def __init__(self, parameters):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        # The reference's clamp: keeps exp() finite for untrained or extreme encoders.
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)), summed over all but the batch dimension (the toy VAE's training loss)."""
        return 0.5 * torch.sum(self.mean**2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
