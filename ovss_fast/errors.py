"""The library's own exceptions for bad input (method.md section 5).

Validation raises these; they subclass ``ValueError`` / ``TypeError`` so a caller's ``except ValueError``
keeps working. The front ends print them as one line; any other exception (a RuntimeError from torch,
a bug in ovss_fast) keeps its traceback.
"""

from __future__ import annotations


class OVSSError(Exception):
    """Base of every user error raised by ovss_fast."""


class InputError(OVSSError, ValueError):
    """A value, shape or option is wrong; the message names the argument and what was seen."""


class InputTypeError(OVSSError, TypeError):
    """An argument has the wrong type or dtype; the message names the argument and what was seen."""


class ModelLoadError(OVSSError, ValueError, RuntimeError):
    """Weights or a model could not be loaded as asked (a checkpoint that does not match, an unreachable
    hub, missing files); the message lists a checkpoint's missing / unexpected keys, and the original
    exception is chained as ``__cause__``. Also a ``RuntimeError``, which the loaders raised before."""


__all__ = ["InputError", "InputTypeError", "ModelLoadError", "OVSSError"]
