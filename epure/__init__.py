"""epure: MMVAE+ for tire cross-section design."""

__version__ = "0.1.0"
