"""User-facing errors: the CLI prints these as one clear message, without a traceback."""

from __future__ import annotations


class DimecError(Exception):
    """An error the user can act on: says what is wrong and what to do."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  hint: {hint}")


class ConfigError(DimecError):
    """Bad configuration value or file. `problems`: one line per bad value, when it reports several."""

    def __init__(self, message: str, hint: str | None = None, problems: list[str] | None = None) -> None:
        super().__init__(message, hint)
        self.problems = list(problems) if problems else [message]


class DataError(DimecError):
    """Missing data file, column, label or empty split."""


class ModelError(DimecError):
    """Unknown model path, bad exit layers, incompatible encoder."""


class ArtifactError(DimecError):
    """A run directory lacks what a stage needs."""


class NotFittedError(DimecError):
    """An estimator was used before `fit`."""


class TierUnavailableError(DimecError):
    """A serving tier could not be reached."""


class TierAuthError(ConfigError):
    """A serving tier refused this client's token: a misconfiguration to fix, not an outage to route around."""


class TierBusyError(TierUnavailableError):
    """A tier refused a request for now (HTTP 429: its queue is full for this source's class)."""

    def __init__(self, message: str, retry_after_s: float, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.retry_after_s = retry_after_s
