"""Errors that name the offending input and say what would be accepted."""


class HyperdescentError(ValueError):
    """Base class of every error raised for bad input."""


class HyperparameterError(HyperdescentError):
    """An unknown hyperparameter, a value outside its bounds, or a kind a method refuses."""


class DataError(HyperdescentError):
    """A dataset that cannot be used: empty, mismatched lengths, not replayable."""


class ConfigError(HyperdescentError):
    """An invalid experiment configuration."""


class NonFiniteError(FloatingPointError):
    """A loss or hypergradient became NaN or infinite."""
