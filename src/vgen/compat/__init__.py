"""Adapters between vgen and the original implementations' checkpoints, configs and calling conventions."""
