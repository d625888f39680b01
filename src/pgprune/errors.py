"""One exception family. Every message says what went wrong and what to do next."""


class PgpruneError(Exception):
    """Base class of every error pgprune raises on purpose."""


class ModelLoadError(PgpruneError):
    """A model could not be found or read."""


class UnsupportedModelError(PgpruneError):
    """The model family has no adapter."""


class DataError(PgpruneError):
    """A dataset is unknown, missing or unusable."""


class ConfigError(PgpruneError):
    """An option or a combination of options is invalid (sparsity, seqlen, K, ...)."""


class CheckpointError(PgpruneError):
    """A checkpoint or run folder is missing, broken or from a different run."""
