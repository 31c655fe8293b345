"""vgen: Lightning + Hydra distributed training for the VGen family of video diffusion models.

``from vgen import VideoPipeline`` is the inference entry point (imported on first use: training does not load it).
"""

__version__ = "0.1.0"
__all__ = ["VideoPipeline", "__version__"]


def __getattr__(name: str):
    if name == "VideoPipeline":
        from vgen.pipeline import VideoPipeline

        return VideoPipeline
    raise AttributeError(f"module 'vgen' has no attribute {name!r}")
