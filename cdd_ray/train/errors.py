"""Errors of a training run that the command line reports as user errors (no Ray, no torch here)."""


class TrainingError(RuntimeError):
    """A run that failed after its retries; the message says where, why, and what was kept."""


class RunDirError(RuntimeError):
    """A run directory that this configuration cannot continue; the message names it and why."""
