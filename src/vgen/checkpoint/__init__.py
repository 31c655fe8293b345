"""Checkpoint formats: vgen training checkpoints, weight export, and adapters to other formats."""
