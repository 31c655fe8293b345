"""The exceptions of bad data, and the one vocabulary of skip reasons every reader and tool counts under.

A bad sample raises :class:`SampleError`; streams skip and count it (training goes on), the data tools count it
in their stats. :class:`DataError` is a source that cannot feed training at all (it stops the run with one line).
"""

from __future__ import annotations

# reason -> what causes it. The training loader (data/skipped/<reason>), filter.py, encode.py and make_shards.py
# count under these names; the README's table is this one.
SKIP_REASONS: dict[str, str] = {
    "empty_member": "a zero-byte media member (or, in make_shards.py, a zero-byte input file)",
    "undecodable": "media that cannot be decoded: truncated or corrupt video, image or latents",
    "too_short": "fewer frames than one clip needs (num_frames at sample_fps; make_shards.py: --min-clip-seconds, "
                 "or --clip-seconds with --split fixed)",
    "missing_member": "no media member of the source's type (e.g. a still in a video source)",
    "no_caption": "a caption is required but the .txt / .json caption is missing or empty",
    "bad_metadata": ".json that is not a JSON object, a caption that is not text, latents of the wrong shape",
    "unsafe_member": "a pickle-capable member (.pyd, .pth, .npy, ...): refused, never loaded",
    "unreadable_shard": "a shard (tar) that could not be opened or ends inside a member",
    "unreadable_input": "a raw input file listed to make_shards.py that is missing or cannot be opened",
    "missing_condition": "a condition map of data.conditions is neither stored in the sample (its member, or the "
                         "clip's frames in it) nor to be extracted (extract: false)",
}


class SampleError(Exception):
    """A sample cannot be used (undecodable, too short, missing or unsafe member).

    ``reason`` is one of :data:`SKIP_REASONS`, the tag skipped samples are counted under, e.g. ``"too_short"``.
    """

    def __init__(self, message: str, reason: str = "undecodable"):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; one of {list(SKIP_REASONS)}")
        super().__init__(message)
        self.reason = reason


class DataError(RuntimeError):
    """A source that cannot feed training: none of its shards gives a sample, or too many samples in a row are
    unusable. The message is one line naming the source; ``vgen.train`` prints it as the run's error."""


def data_error_message(err: BaseException) -> str:
    """The one-line message of a :class:`DataError`, also when a DataLoader worker re-raised it (torch then wraps
    the worker's traceback into the message: its last line is the original)."""
    text = str(err).strip()
    if text.startswith("Caught "):
        last = text.splitlines()[-1]
        prefix = f"{DataError.__module__}.{DataError.__name__}: "
        text = last[len(prefix):] if last.startswith(prefix) else last.split(": ", 1)[-1]
    return " ".join(text.split())
