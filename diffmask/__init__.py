"""diffmask: medical image segmentation with synthetic data from text-conditioned diffusion."""

__version__ = "0.1.0"
