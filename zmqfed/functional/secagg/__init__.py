"""Secure aggregation (SecAgg+): the aggregator learns only the clients' weighted sum.

One call on every node, inside ``with maintainer:``::

    zmqfed.functional.secure_aggregation(timeout=30)

On a collaborator it wraps every upload in the protocol
(:class:`~zmqfed.functional.secagg.client.SecAggClient`); on the aggregator
it runs the phases and, each step, records exactly one upload -- the
unmasked weighted mean -- in ``data_list``, then ends the step
(:class:`~zmqfed.functional.secagg.server.SecAggServer`). ``API`` and
``run_collaborator`` (and ``zmqfed-node`` apps, through
``App(configure=...)``) run unchanged. The protocol, the threat model and
the measured cost are in docs/privacy.md. Needs ``pip install
'zmqfed[secagg]'``.
"""

from __future__ import annotations

from zmqfed.core import current_maintainer
from zmqfed.functional.secagg import crypto
from zmqfed.functional.secagg.client import SecAggClient
from zmqfed.functional.secagg.ring import SecAggConfig
from zmqfed.functional.secagg.server import SecAggAborted, SecAggServer

__all__ = ["SecAggAborted", "SecAggClient", "SecAggConfig", "SecAggServer", "secure_aggregation"]


def secure_aggregation(
    threshold: int | float | None = None,
    *,
    neighbours: int | None = None,
    clipping_range: float = 8.0,
    quantization_range: int = 2**22,
    modulus_range: int = 2**32,
    max_weight: float = 1000.0,
    weight_key: str = "instances",
    timeout: float | None = None,
) -> SecAggClient | SecAggServer:
    """Aggregate the uploads of the current Maintainer's group securely (SecAgg+).

    Call it with the same arguments on the aggregator and on every
    collaborator. Parameters are those of
    :class:`~zmqfed.functional.secagg.ring.SecAggConfig`: ``threshold``
    shares rebuild a client's secrets (default: a majority of its
    ``neighbours``); values are clipped to ``clipping_range`` and quantized
    to ``quantization_range`` levels in the ring of ``modulus_range``;
    weights (``meta[weight_key]``) may reach ``max_weight``; each phase waits
    ``timeout`` seconds for stragglers (None: for every client that is
    connected or has not joined yet; one that joined and left is a dropout).

    Returns the hooks' object (its ``last_round`` says who took part).
    Raises ``ConfigError`` when the group cannot run with these parameters.
    With CURVE (``Maintainer(curve=...)``) the pairwise keys are the nodes'
    long-term CurveZMQ keys; otherwise fresh X25519 keys each round.
    """
    m = current_maintainer("secure_aggregation()")
    crypto.require()
    config = SecAggConfig(
        threshold=threshold,
        neighbours=neighbours,
        clipping_range=clipping_range,
        quantization_range=quantization_range,
        modulus_range=modulus_range,
        max_weight=max_weight,
        weight_key=weight_key,
        timeout=timeout,
    )
    config.resolve(len(m.fed_props.collaborators))  # a group this cannot run fails now
    if m.aggregator:
        m.add_feature(
            "secure_aggregation",
            excludes=("fedbuff",),
            why="its masks cancel only in the sum of one synchronous round's uploads",
        )
        server = SecAggServer(config)
        server.install(m)
        return server
    client = SecAggClient(config)
    m.register_upload_wrapper(client)
    return client
