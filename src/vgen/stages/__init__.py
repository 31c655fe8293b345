"""Training stages: one LightningModule per stage of the VGen recipes, all sharing :class:`DiffusionStage`."""

from vgen.stages.base import DiffusionStage
from vgen.stages.joint import JointImageVideoStage

__all__ = ["DiffusionStage", "JointImageVideoStage"]
