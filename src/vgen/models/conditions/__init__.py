"""Conditioning inputs of the UNet3D as composable modules (see :mod:`vgen.models.conditions.base`)."""

from vgen.models.conditions.base import (
    KINDS,
    NULL_RULES,
    Condition,
    ConditionError,
    ConditionInputs,
    Encoders,
    UNetDims,
    build_condition,
)
from vgen.models.conditions.standard import (
    EmbeddingMLP,
    FirstFrame,
    ImageTokens,
    ScalarEmbedding,
    TextPooling,
    TextTokens,
    original_names,
)

__all__ = [
    "KINDS",
    "NULL_RULES",
    "Condition",
    "ConditionError",
    "ConditionInputs",
    "EmbeddingMLP",
    "Encoders",
    "FirstFrame",
    "ImageTokens",
    "ScalarEmbedding",
    "TextPooling",
    "TextTokens",
    "UNetDims",
    "build_condition",
    "original_names",
]
