"""``CollaboratorSide``: a collaborator's ``step()`` -- upload, then download, blocking.

:meth:`CollaboratorSide.step_cycle` is the same step as a cycle that yields
where it would wait (:mod:`zmqfed.federated.collaborator_link`), so a
:class:`~zmqfed.federated.multiplex.Multiplexer` can run the steps of
thousands of collaborators in one thread.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from zmqfed.core.contracts import StepResult
from zmqfed.errors import ConfigError, PeerTimeout
from zmqfed.federated import CollaboratorTransport, Pipe
from zmqfed.federated.collaborator_link import Cycle, drive
from zmqfed.meta import Meta
from zmqfed.wire import Kind
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
        return {"resends": self.transport.resends}

    def close(self, *, final: bool) -> None:
        self.transport.close()

    # -- the step --------------------------------------------------------------------
    def step(
        self, upload: bool, download: bool, meta: dict[str, Any] | None, timeout: float | None
    ) -> StepResult:
        return drive(self.step_cycle(upload, download, meta, timeout), self.transport.link.port)

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
        out_meta = Meta(meta if meta is not None else m.meta).to_json_dict()
        if upload:
            if not m.packaged_data:
                m.package()
            yield from t.request_cycle(
                Kind.PUSH,
                meta=out_meta,
                version=max(m.version, 0),
                tensors=m.apply_hooks(m.packaged_data, unpackage=False),
                timeout=_left(deadline),
            )
        if download:
            reply = yield from t.request_cycle(
                Kind.PULL,
                meta=out_meta,
                version=max(m.version, 0),
                timeout=_left(deadline),
                destination=self._own_tensor if m.download_in_place else None,
            )
            m.data = m.receive(reply.tensors, t.aggregator_name)
            m.meta = Meta(reply.meta)
            t.pipe.meta = Meta(reply.meta)
            if meta is not None:
                meta.update(m.meta)
        return StepResult(uploads=int(upload), downloads=int(download))

    def _own_tensor(self, desc: TensorDesc) -> Tensor | None:
        """Where a streamed download of ``desc`` may land: the local tensor it replaces."""
        return self.m.state_dict.get(desc.key) if desc.field == "param" else None


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())
