"""GPU cost profiles: iteration time of an engine batch (see docs/cost_profiles.md)."""

from replica.cost.model import CostModel
from replica.cost.profile import DEFAULT_COST_PROFILE, CostProfile, available_profiles, load_profile
from replica.cost.shape import BatchShape

__all__ = ["DEFAULT_COST_PROFILE", "BatchShape", "CostModel", "CostProfile", "available_profiles", "load_profile"]
