"""The ladder network and the model families that train it."""
from provlae.models.families import FAMILIES, Family, LossOutput, build_family, register
from provlae.models.ladder import Gates, LadderOutput, LadderVAE

__all__ = ["FAMILIES", "Family", "Gates", "LadderOutput", "LadderVAE", "LossOutput", "build_family",
           "register"]
