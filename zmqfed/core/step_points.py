"""The points of an aggregator's step where step hooks run, named for what happens there.

Each step opens with ``step_started``.  Then, for every peer with something to
do, the loop runs ``before_peer``, one branch, and ``after_peer``:

====================  =====================================================
branch                points
====================  =====================================================
an upload arrived     ``upload_received`` (False: park it) -> ``upload_handled``
                      (flag: counted) or ``request_parked``
a download is asked   ``download_requested`` (False: park it) ->
                      ``download_served`` (flag: sent) or ``request_parked``
an exchange is asked  ``exchange_requested`` (True: answer it, False: park
                      it) -> ``exchange_answered`` (flag: sent) or
                      ``request_parked``
nothing pending       ``peer_idle``
the peer is gone      ``peer_leaving`` -> ``peer_left``
none of these         ``peer_invalid``
====================  =====================================================

After a step, ``aggregated`` runs once (no peer) when a round runner
(``API``, the node runner) has aggregated the step's uploads: the rule has
installed its result (``p.grad`` holds the pseudo-gradient) and the server
optimizer has not stepped yet. Differential privacy adds its noise there.

OpenFed named the points from the aggregator's side of a transfer (it
"downloads" an upload); those names are kept as aliases of the same values:
``before_download`` is ``upload_received``, ``before_upload`` is
``download_requested``, and so on (:data:`OPENFED_NAMES`).
"""

from __future__ import annotations

__all__ = [
    "OPENFED_NAMES",
    "STEP_NAMES",
    "after_destroy",
    "after_download",
    "after_peer",
    "after_upload",
    "aggregated",
    "at_failed",
    "at_first",
    "at_invalid_state",
    "at_last",
    "at_new_episode",
    "at_zombie",
    "before_destroy",
    "before_download",
    "before_peer",
    "before_upload",
    "canonical",
    "download_requested",
    "download_served",
    "exchange_answered",
    "exchange_requested",
    "peer_idle",
    "peer_invalid",
    "peer_leaving",
    "peer_left",
    "request_parked",
    "step_started",
    "upload_handled",
    "upload_received",
]

step_started = "step_started"
before_peer = "before_peer"
upload_received = "upload_received"  # return False to park the upload for now
upload_handled = "upload_handled"  # flag: the upload was counted
download_requested = "download_requested"  # return False to park the request
download_served = "download_served"  # flag: the model was sent
exchange_requested = "exchange_requested"  # True: answer it now, False: park it
exchange_answered = "exchange_answered"  # flag: the REPLY was sent
peer_idle = "peer_idle"
peer_invalid = "peer_invalid"
request_parked = "request_parked"
peer_leaving = "peer_leaving"
peer_left = "peer_left"
after_peer = "after_peer"
aggregated = "aggregated"  # after the rule installed the aggregate, before the server step

#: Every step point, in the order a step meets them.
STEP_NAMES = (
    step_started,
    before_peer,
    upload_received,
    upload_handled,
    download_requested,
    download_served,
    exchange_requested,
    exchange_answered,
    peer_idle,
    peer_invalid,
    request_parked,
    peer_leaving,
    peer_left,
    after_peer,
    aggregated,
)

# OpenFed's names (the aggregator "downloads" what a collaborator uploads).
at_new_episode = step_started
at_first = before_peer
before_download = upload_received
after_download = upload_handled
before_upload = download_requested
after_upload = download_served
at_zombie = peer_idle
at_invalid_state = peer_invalid
at_failed = request_parked
before_destroy = peer_leaving
after_destroy = peer_left
at_last = after_peer

#: OpenFed's point name -> zmqfed's.
OPENFED_NAMES = {
    "at_new_episode": at_new_episode,
    "at_first": at_first,
    "before_download": before_download,
    "after_download": after_download,
    "before_upload": before_upload,
    "after_upload": after_upload,
    "at_zombie": at_zombie,
    "at_invalid_state": at_invalid_state,
    "at_failed": at_failed,
    "before_destroy": before_destroy,
    "after_destroy": after_destroy,
    "at_last": at_last,
}


def canonical(name: str) -> str | None:
    """The step point ``name`` refers to (zmqfed's or OpenFed's name), or None."""
    if name in STEP_NAMES:
        return name
    return OPENFED_NAMES.get(name)
