"""Bundled benchmark tasks: `get(name)` returns a `Task` (model factory, splits, default space)."""

from .base import Task
from .registry import get, names

__all__ = ["Task", "get", "names"]
