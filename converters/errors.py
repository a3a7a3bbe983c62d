"""The converter's errors. Every one carries a message a user can act on; the CLI prints it as one line.

Bad input (a broken model, wrong calibration data, an unknown profile) is never retried; a refusal by the fidelity
gate is not an error at all but a report with ``shippable = false``.
"""

from __future__ import annotations


class ConvertError(Exception):
    """Root of the converter's errors."""

    exit_code = 1


class InputError(ConvertError):
    """The user's input cannot be used as given."""

    exit_code = 3


class InvalidModelError(InputError):
    """Not a model, a truncated model, or a model that fails the ONNX checker."""


class UnsafeModelError(InvalidModelError):
    """A model file that would run code when loaded: pickled Python objects or compiled native code."""


class UnsupportedOpError(InputError):
    """The model uses operators no target runtime can execute."""


class CalibrationError(InputError):
    """Calibration or evaluation data that does not fit the model (names, shapes, dtypes, count)."""


class DataTooLargeError(CalibrationError):
    """Calibration or evaluation data that would take more memory than allowed once decompressed."""


class QuantizationError(ConvertError):
    """The quantizer itself failed on a valid model (reported per profile; other profiles go on)."""
