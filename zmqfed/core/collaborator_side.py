"""``CollaboratorSide``: a collaborator's ``step()`` -- upload, then download, blocking.

The upload goes through the registered upload wrappers (outermost first)
before it is sent as a PUSH; ``exchange`` makes one more request/answer
(ASK/REPLY) with the aggregator, e.g. from a wrapper.

:meth:`CollaboratorSide.step_cycle` is the same step as a cycle that yields
where it would wait (:mod:`zmqfed.federated.collaborator_link`), so a
:class:`~zmqfed.federated.multiplex.Multiplexer` can run the steps of
thousands of collaborators in one thread.  An upload with wrappers is the
exception: a wrapper calls ``send`` and ``exchange`` as plain functions, so
it runs to its end where the cycle reaches it.
"""

from __future__ import annotations

import time
from functools import partial
from typing import TYPE_CHECKING, Any

from zmqfed.core.contracts import SendUpload, StepResult, UploadWrapper
from zmqfed.errors import ConfigError, PeerTimeout
from zmqfed.federated import CollaboratorTransport, Pipe
from zmqfed.federated.collaborator_link import Cycle, drive
from zmqfed.meta import Meta
from zmqfed.wire import Envelope, Kind
from zmqfed.wire.header import TensorDesc

if TYPE_CHECKING:
    from torch import Tensor

    from zmqfed.core.maintainer import Maintainer

__all__ = ["CollaboratorSide"]


class CollaboratorSide:
    """Runs ``Maintainer.step()`` on a collaborator, over a :class:`CollaboratorTransport`."""

    def __init__(self, maintainer: Maintainer, transport: CollaboratorTransport) -> None:
        self.m = maintainer
        self.transport = transport
        #: Wrappers around the upload, in registration order (the first runs outermost).
        self.wrappers: list[UploadWrapper] = []

    # -- what the Maintainer asks ------------------------------------------------
    def pipes(self) -> list[Pipe]:
        return [self.transport.pipe]

    def version_changed(self) -> None:
        pass  # the version travels with the next request

    def model_changed(self) -> None:
        pass  # uploads are encoded when sent

    def manual_stop(self) -> None:
        pass  # a collaborator's step ends when it is answered

    def wake_at(self, when: float) -> None:
        pass

    def discard(self, pipe: Pipe | None, reason: str) -> None:
        raise ConfigError("discard() is for an aggregator's step hooks")

    def stats(self) -> dict[str, Any]:
        t, link = self.transport, self.transport.link
        return {
            "resends": t.resends,
            "disconnects": link.disconnects,
            "reconnects": link.reconnects,
            "chunks_in": t.chunks_in,
            "chunks_out": t.chunks_out,
            **link.traffic.as_dict(),
        }

    def close(self, *, final: bool) -> None:
        self.transport.close()

    # -- the step --------------------------------------------------------------------
    def step(
        self, upload: bool, download: bool, meta: dict[str, Any] | None, timeout: float | None
    ) -> StepResult:
        return drive(
            self.step_cycle(upload, download, meta, timeout), self.transport.link.current_port
        )

    def step_cycle(
        self, upload: bool, download: bool, meta: dict[str, Any] | None, timeout: float | None
    ) -> Cycle[StepResult]:
        """:meth:`step` as a cycle: yields where it would wait."""
        try:
            return (yield from self._step(upload, download, meta, timeout))
        except PeerTimeout as exc:
            # Each request gets only what is left of the step's time: report
            # the step's timeout, not the remainder the last request had.
            if timeout is None or exc.seconds == timeout:
                raise
            raise PeerTimeout(exc.peer, timeout, exc.what) from exc

    def _step(
        self, upload: bool, download: bool, meta: dict[str, Any] | None, timeout: float | None
    ) -> Cycle[StepResult]:
        m, t = self.m, self.transport
        deadline = None if timeout is None else time.monotonic() + timeout
        tensors: dict[str, dict[str, Tensor]] = {}
        if upload:
            if not m.packaged_data:
                m.package()
            # hooks first: a package hook may add to the upload's meta (local DP's clip bit)
            tensors = m.apply_hooks(m.packaged_data, unpackage=False)
        out_meta = Meta(meta if meta is not None else m.meta).to_json_dict()
        if upload and not self.wrappers:
            yield from t.request_cycle(
                Kind.PUSH,
                meta=out_meta,
                version=max(m.version, 0),
                tensors=tensors,
                timeout=_left(deadline),
            )
        elif upload:

            def push(tensors: dict[str, dict[str, Tensor]], meta: dict[str, Any]) -> Envelope:
                return t.request(
                    Kind.PUSH,
                    meta=meta,
                    version=max(m.version, 0),
                    tensors=tensors,
                    timeout=_left(deadline),
                )

            send: SendUpload = push
            for wrapper in reversed(self.wrappers):  # the first registered runs outermost
                send = partial(_wrapped, wrapper, m, send)
            send(tensors, out_meta)
        if download:
            reply = yield from t.request_cycle(
                Kind.PULL,
                meta=out_meta,
                version=max(m.version, 0),
                timeout=_left(deadline),
                destination=self._own_tensor if m.download_in_place else None,
                expect_bytes=sum(p.numel() * p.element_size() for p in m.state_dict.values()),
            )
            m.data = m.receive(reply.tensors, t.aggregator_name)
            m.meta = Meta(reply.meta)
            t.pipe.meta = Meta(reply.meta)
            if meta is not None:
                meta.update(m.meta)
        return StepResult(uploads=int(upload), downloads=int(download))

    def exchange(
        self,
        topic: str,
        meta: dict[str, Any] | None,
        tensors: dict[str, dict[str, Tensor]] | None,
        timeout: float | None,
    ) -> Envelope:
        if not isinstance(topic, str) or not topic:
            raise ConfigError(f"an exchange needs a topic (a non-empty string), got {topic!r}")
        out = Meta(meta or {}).to_json_dict()
        out["topic"] = topic
        return self.transport.request(
            Kind.ASK, meta=out, version=max(self.m.version, 0), tensors=tensors, timeout=timeout
        )

    def _own_tensor(self, desc: TensorDesc) -> Tensor | None:
        """Where a streamed download of ``desc`` may land: the local tensor it replaces."""
        return self.m.state_dict.get(desc.key) if desc.field == "param" else None


def _wrapped(
    wrapper: UploadWrapper,
    m: Maintainer,
    send: SendUpload,
    tensors: dict[str, dict[str, Tensor]],
    meta: dict[str, Any],
) -> Envelope:
    return wrapper(m, tensors, meta, send)


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())
