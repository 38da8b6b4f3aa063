"""GPU cost profiles: iteration time of an engine batch (see docs/cost_profiles.md)."""

from replica.cost.profile import CostProfile, available_profiles, load_profile
from replica.cost.shape import BatchShape

__all__ = ["BatchShape", "CostProfile", "available_profiles", "load_profile"]
