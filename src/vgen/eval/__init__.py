"""Evaluation of video models: FVD (I3D), CLIPSIM, frame consistency, motion magnitude (RAFT) and the toy metrics
of the synthetic demo data, over a prompt set; ``python -m vgen.eval`` is the command line (see its module)."""

from vgen.eval.frechet import feature_statistics, frechet_distance, frechet_distance_of_features
from vgen.eval.metrics import METRICS, Extractors, Metric, MetricSpec, build_metrics
from vgen.eval.run import EvalError, Prompt, Report, evaluate_pipeline, evaluate_videos, read_prompts

__all__ = [
    "METRICS", "EvalError", "Extractors", "Metric", "MetricSpec", "Prompt", "Report", "build_metrics",
    "evaluate_pipeline", "evaluate_videos", "feature_statistics", "frechet_distance", "frechet_distance_of_features",
    "read_prompts",
]
