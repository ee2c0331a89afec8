"""Tuners own a meta-optimizer over raw λ and a history; they never re-implement a hypergradient."""

from .offline import OfflineTuner
from .online import OnlineTuner
from .schedule import Schedule

__all__ = ["OnlineTuner", "OfflineTuner", "Schedule"]
