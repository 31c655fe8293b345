"""Lightning callbacks: throughput/memory metrics, validation videos."""

from vgen.callbacks.metrics import ThroughputMonitor
from vgen.callbacks.samples import SampleVideos

__all__ = ["SampleVideos", "ThroughputMonitor"]
