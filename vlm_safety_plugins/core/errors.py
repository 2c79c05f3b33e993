"""Exceptions with messages that say what was wrong and where."""

from contextlib import contextmanager


class VLMSafetyError(Exception):
    """Base class of every error this package raises on purpose."""


class ConfigError(VLMSafetyError, ValueError):
    """A safety configuration is invalid; names the source, the key path and what was expected."""

    def __init__(self, message: str, *, source: str | None = None, path: str | None = None):
        self.source, self.path, self.reason = source, path, message
        where = ": ".join(part for part in (source, path) if part)
        super().__init__(f"{where}: {message}" if where else message)


class DefenseError(VLMSafetyError, RuntimeError):
    """A defense could not do its work on this request (missing image, unsupported input, ...)."""


class ArtifactError(ConfigError):
    """A calibration artifact is missing, unreadable, malformed or made for another model; names the file."""


class AdapterError(VLMSafetyError, RuntimeError):
    """The model or processor does not look like what the model adapter expects."""


class GenerationCancelled(Exception):
    """Raised by the caller's own code (a stopping criterion, a streamer) to abort a defended
    generate: it propagates as is, never read as a defense failure nor answered with a refusal."""


class ModelLoadError(VLMSafetyError, OSError):
    """A model, processor or tokenizer could not be loaded (bad name, missing path, offline)."""


@contextmanager
def loading(what: str):
    """Turn any error raised while loading ``what`` into a ModelLoadError that names it."""
    try:
        yield
    except Exception as error:
        raise ModelLoadError(f"could not load {what}: {type(error).__name__}: {error}") from None
