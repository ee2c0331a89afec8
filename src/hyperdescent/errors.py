"""Errors that name the offending input and say what would be accepted (DESIGN.md)."""


class HyperdescentError(ValueError):
    """Base class of every error raised for bad input."""


class InputTypeError(HyperdescentError, TypeError):
    """An argument of a type that cannot be used (also a TypeError, as Python users expect)."""


class HyperparameterError(HyperdescentError):
    """An unknown hyperparameter, a value outside its bounds, or a kind a method refuses."""


class HyperparameterTypeError(HyperparameterError, InputTypeError):
    """A hyperparameter declaration or value of the wrong type (a string for a number...)."""


class DataError(HyperdescentError):
    """A dataset that cannot be used: empty, mismatched lengths, not replayable."""


class ConfigError(HyperdescentError):
    """An invalid experiment configuration."""


class NonFiniteError(FloatingPointError):
    """A loss or hypergradient became NaN or infinite."""
