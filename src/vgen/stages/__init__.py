"""Training stages: one LightningModule per stage of the VGen recipes, all sharing :class:`DiffusionStage`.

Stage 1 :class:`ImagePretrainStage`, stage 2 :class:`JointImageVideoStage` (T2V, I2VGen-XL, TF-T2V options),
stage 3 :class:`HQFinetuneStage`, the cascade's :class:`RefinementStage`, and DreamVideo's customisation
:class:`DreamVideoStage`.
"""

from vgen.stages.base import DiffusionStage
from vgen.stages.dreamvideo import DreamVideoStage
from vgen.stages.hq import HQFinetuneStage
from vgen.stages.image import ImagePretrainStage
from vgen.stages.joint import JointImageVideoStage
from vgen.stages.refine import RefinementStage

__all__ = ["DiffusionStage", "DreamVideoStage", "HQFinetuneStage", "ImagePretrainStage", "JointImageVideoStage", "RefinementStage"]
