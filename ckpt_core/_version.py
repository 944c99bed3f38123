"""The ckpt-core version, apart from the package root so storage can record it."""

__version__ = "0.1.0"
