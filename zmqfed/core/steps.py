"""Names of the points in an aggregator's step where step hooks run.

For every pipe with something to do the loop runs ``at_first``, then one of
the branches below, then ``at_last``; ``at_new_episode`` opens each step.
"""

from __future__ import annotations

__all__ = [
    "STEP_NAMES",
    "after_destroy",
    "after_download",
    "after_upload",
    "at_failed",
    "at_first",
    "at_invalid_state",
    "at_last",
    "at_new_episode",
    "at_zombie",
    "before_destroy",
    "before_download",
    "before_upload",
]

at_new_episode = "at_new_episode"
at_first = "at_first"
before_download = "before_download"  # a collaborator pushed; return False to refuse for now
after_download = "after_download"
before_upload = "before_upload"  # a collaborator pulls; return False to park the request
after_upload = "after_upload"
at_zombie = "at_zombie"
at_invalid_state = "at_invalid_state"
at_failed = "at_failed"
before_destroy = "before_destroy"
after_destroy = "after_destroy"
at_last = "at_last"

STEP_NAMES = (
    at_new_episode,
    at_first,
    before_download,
    after_download,
    before_upload,
    after_upload,
    at_zombie,
    at_invalid_state,
    at_failed,
    before_destroy,
    after_destroy,
    at_last,
)
