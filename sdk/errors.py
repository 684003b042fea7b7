"""The errors nextoken raises. Every one says what is wrong and what to do about it."""

from __future__ import annotations

__all__ = [
    "ContextWindowError",
    "DeviceError",
    "ExportError",
    "InvalidRequestError",
    "ManifestMismatchError",
    "ModelPackageError",
    "NextokenError",
    "PluginError",
    "SchedulerStoppedError",
    "is_integer",
    "is_number",
]


class NextokenError(Exception):
    """Base class of every error nextoken raises on purpose."""


class ModelPackageError(NextokenError):
    """A model package is missing, incomplete or unreadable."""


class ManifestMismatchError(ModelPackageError):
    """nextoken.json and the ONNX graph disagree."""


class InvalidRequestError(NextokenError, ValueError):
    """A generation request is invalid (empty prompt, bad parameter ...); ``param``: the request's
    field at fault (e.g. ``"tool_choice"``), where one is (a server's error names it)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        """
        Args:
            message: what is wrong and what to do.
            param: the request's field at fault, where one is.
        """
        super().__init__(message)
        self.param = param


class ContextWindowError(InvalidRequestError):
    """A prompt does not fit the model's context window."""


class ExportError(NextokenError):
    """Exporting a Hugging Face model to a nextoken package failed."""


class DeviceError(NextokenError):
    """The requested execution device cannot be used on this host."""


class PluginError(NextokenError):
    """A plugin failed; the message names the plugin and the hook or piece that raised
    (``plugin``: its name, where it is known)."""

    def __init__(self, message: str, plugin: str | None = None) -> None:
        """
        Args:
            message: the plugin, the hook or piece, and what it did.
            plugin: the plugin's name, where it is known.
        """
        super().__init__(message)
        self.plugin = plugin


class SchedulerStoppedError(NextokenError):
    """The scheduler is closed, or its loop died: it takes no more requests (a server answers 503)."""


def describe(value: object, limit: int = 60) -> str:
    """A value as an error message shows it: its type and the start of its repr."""
    text = repr(value)
    return f"{type(value).__name__} {text[:limit]}{'...' if len(text) > limit else ''}"


def is_integer(value: object) -> bool:
    """An integer as users pass one: Python's or numpy's, not a bool."""
    import numbers

    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A real number as users pass one: an integer (not a bool) or a float, Python's or numpy's."""
    import numbers

    return isinstance(value, numbers.Real) and not isinstance(value, bool)
