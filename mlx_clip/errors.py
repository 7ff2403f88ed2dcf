"""Domain errors: each is a user mistake or a bad input, shown as one line with exit code 2."""


class MlxClipError(Exception):
    """Base class. The CLI prints `error: <message>` and exits with code 2, no traceback."""

    exit_code = 2


class ConfigError(MlxClipError):
    """A config.json, training config or option value that is not valid."""


class CheckpointError(MlxClipError):
    """Missing, corrupt or mismatched weight files."""


class DataError(MlxClipError):
    """A dataset, captions file or class folder that cannot be used."""


class ImageError(DataError):
    """A file that cannot be decoded as an image."""


class ConvertError(MlxClipError):
    """A conversion that cannot be done exactly."""


def check_int(name: str, value, minimum: int) -> int:
    """`value` if it is an integer (not a bool) of at least `minimum`, else ConfigError naming it:
    the one check behind every "must be an integer" of the toolkit's options."""
    from numbers import Integral

    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        rule = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {rule}, got {value!r}")
    return value
