"""User-facing errors: one line that names the problem. The CLI prints them without a traceback."""


class LaVITError(Exception):
    """Base class of the errors a user can fix (bad input, bad checkpoint, bad option)."""


class CheckpointError(LaVITError):
    """A checkpoint folder or weight file is missing, unreadable or does not match the model."""


class ImageError(LaVITError):
    """An input image is missing, corrupt, too large or not an image."""


class MissingDependencyError(LaVITError):
    """An optional dependency (torch, diffusers) is needed for this operation."""
