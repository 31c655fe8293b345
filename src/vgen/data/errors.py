"""The one exception a bad sample raises; streams skip and count it instead of stopping training."""

from __future__ import annotations


class SampleError(Exception):
    """A sample cannot be used (undecodable, too short, missing or unsafe member).

    ``reason`` is a short tag the streams count skipped samples under, e.g. ``"too_short"``.
    """

    def __init__(self, message: str, reason: str = "undecodable"):
        super().__init__(message)
        self.reason = reason
