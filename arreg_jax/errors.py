"""User-facing error types.

Every failure a user can cause (a bad config value, missing or corrupt data, an impossible shape, a diverging run)
is raised as one of these, with a message that names the problem and the fix. ``arreg_jax.main`` prints the
message (no traceback) and exits with a non-zero status; anything else is a bug and keeps its traceback.
"""


class ArregError(Exception):
  """Base class: an error caused by the user's input, reported without a traceback."""


class ConfigError(ArregError, ValueError):
  """A config value is unknown, missing or out of range."""


class DataError(ArregError, OSError):
  """A dataset is missing, corrupt or not prepared."""


class DivergenceError(ArregError, FloatingPointError):
  """Training produced a NaN or infinite loss."""


class OutputError(ArregError, OSError):
  """A result file could not be written (a full disk, a file-size limit, no permission); nothing was half-written."""


class MemoryPlanError(ArregError, MemoryError):
  """A compiled step needs more device memory than the device has."""
