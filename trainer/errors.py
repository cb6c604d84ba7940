"""The trainer's error types for mistakes a user can make: the CLI prints their message as one
line. Anything else is a bug and keeps its traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """A user-fixable configuration problem; the message names the key and the fix."""


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, damaged, or from a different setup; the
    message names the file or setting and what to do."""


class LaunchError(RuntimeError):
    """A process started outside what ``torchrun`` sets up (RANK/WORLD_SIZE that describe no
    process of a run, more processes than GPUs); the message says how to launch."""
