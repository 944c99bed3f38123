"""Exceptions raised by ckpt; each message names the value, the field and the fix."""

from __future__ import annotations


class CkptError(Exception):
    """Base class of every error ckpt raises on purpose."""


class ConfigError(CkptError, ValueError):
    """A configuration value is invalid; the message names the field."""


class PluginError(CkptError):
    """A converter plugin is missing, broken or misbehaving."""


class CheckpointError(CkptError):
    """A checkpoint is missing, damaged or does not match the model."""
