"""Differentiable inner optimizers as pure `init`/`update` functions over dicts of tensors."""

from .adam import Adam, AdamW
from .base import Optimizer, tensor_state, with_tensor_state
from .rmsprop import RMSprop
from .sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "RMSprop", "Optimizer", "tensor_state", "with_tensor_state"]
