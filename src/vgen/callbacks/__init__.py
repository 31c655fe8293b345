"""Lightning callbacks: throughput/memory metrics, validation videos, in-training evaluation."""

from vgen.callbacks.evaluation import Evaluation
from vgen.callbacks.metrics import ThroughputMonitor
from vgen.callbacks.samples import SampleVideos

__all__ = ["Evaluation", "SampleVideos", "ThroughputMonitor"]
