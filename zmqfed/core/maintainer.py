"""``Maintainer``: bridges federated algorithms and the communication layer.

A Maintainer serves one federated group. On a collaborator, ``step()`` uploads
the packaged data and/or downloads the model, blocking until the aggregator
answers. On the aggregator, ``step()`` runs one poller loop over the group's
ROUTER: every incoming message sets its pipe's state and the registered step
hooks decide what happens and when the step ends (``manual_stop``).
"""

from __future__ import annotations

import atexit
import logging
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from zmqfed.core import steps
from zmqfed.core.context import pop_maintainer, push_maintainer
from zmqfed.core.loop import AggregatorLoop
from zmqfed.errors import ConfigError, PeerTimeout, ProtocolError
from zmqfed.federated import (
    AggregatorGroup,
    CollaboratorLink,
    CollaboratorPipe,
    FederatedProperties,
    Pipe,
    SocketOptions,
)
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import shutdown
from zmqfed.meta import Meta
from zmqfed.wire import DEFAULT_LIMITS, DEFAULT_STREAM, Limits, StreamConfig
from zmqfed.wire.header import TensorDesc

__all__ = ["Maintainer"]

log = logging.getLogger(__name__)

PackageHook = Callable[[dict[str, Tensor], Tensor], dict[str, Tensor]]
StepHook = Callable[..., Any]

_live: weakref.WeakSet[Maintainer] = weakref.WeakSet()


class Maintainer:
    """The user interface of one node in one federated group.

    Parameters
    ----------
    fed_props:
        The group, as returned by ``zmqfed.topo.analysis``.
    state_dict:
        The tensors exchanged, usually ``network.state_dict(keep_vars=True)``;
        may be given later with :meth:`load_state_dict`.
    timeout:
        Default bound in seconds on every ``step()``; ``None`` waits as long as
        the peers stay reachable.
    codec:
        Tensor codec for outgoing data: ``raw``, ``lz4``, ``shuffle-lz4``, ``auto``.
    limits:
        Wire limits for incoming messages (sizes, pickle permission); by
        default sized from ``state_dict`` (:meth:`zmqfed.wire.Limits.for_model`),
        which bounds the memory a peer can make this node queue.
    socket_options:
        Heartbeat, reconnect and linger settings.
    curve:
        CurveZMQ keys (``zmqfed.federated.Curve(keys_dir)``): encrypt and
        authenticate every connection; required for ``limits.allow_pickle``.
    stream:
        When messages are streamed in chunks under credit, the chunk and
        window sizes, and the aggregator's budget for streamed uploads
        (:class:`zmqfed.wire.StreamConfig`).
    download_in_place:
        A collaborator receives a streamed model straight into its own
        ``state_dict`` tensors (same dtype and shape), so a huge model needs
        no second copy.  The tensors then hold the download as soon as
        ``step()`` returns, before ``unpackage``.

    Examples
    --------
    >>> maintainer = Maintainer(props, network.state_dict(keep_vars=True))  # doctest: +SKIP
    >>> with maintainer:  # doctest: +SKIP
    ...     zmqfed.functional.count_step(2)
    >>> maintainer.step()  # doctest: +SKIP
    """

    def __init__(
        self,
        fed_props: FederatedProperties,
        state_dict: Mapping[str, Tensor] | None = None,
        *,
        timeout: float | None = None,
        codec: str = "raw",
        limits: Limits | None = None,
        socket_options: SocketOptions | None = None,
        idle_interval: float = 0.5,
        curve: Curve | None = None,
        stream: StreamConfig | None = None,
        download_in_place: bool = False,
    ) -> None:
        if not isinstance(fed_props, FederatedProperties):
            raise ConfigError(
                f"Maintainer needs FederatedProperties (from zmqfed.topo.analysis), got {fed_props!r}"
            )
        if timeout is not None and timeout <= 0:
            raise ConfigError(f"timeout must be positive seconds or None, got {timeout!r}")
        self.fed_props = fed_props
        self.timeout = timeout
        self.stream = stream or DEFAULT_STREAM
        if limits is None:  # MAXMSGSIZE and message bounds from the model's size
            limits = (
                Limits.for_model(state_dict, stream_threshold=self.stream.threshold)
                if state_dict
                else DEFAULT_LIMITS
            )
        self.limits = limits
        if self.limits.allow_pickle and curve is None:
            raise ConfigError(
                "allow_pickle lets peers run code on this node; it is only allowed behind CURVE "
                "(pass curve=Curve(keys_dir))"
            )
        self.codec = codec
        self.download_in_place = download_in_place
        self.state_dict: dict[str, Tensor] = dict(state_dict) if state_dict is not None else {}
        self.version = 0
        self.meta = Meta()
        self.meta_list: list[Meta] = []
        #: The data just received: name -> field ('param', optimizer state) -> tensor.
        self.data: dict[str, dict[str, Tensor]] = {}
        #: Received uploads (aggregator), keyed by this node's own tensors as in OpenFed.
        self.data_list: list[dict[Tensor, dict[str, Tensor]]] = []
        #: What the next upload (or an aggregator's next DATA) carries.
        self.packaged_data: dict[str, dict[str, Tensor]] = {}
        self.pipes: list[Pipe] = []
        self.pipe: Pipe | None = None
        self.current_step: str | None = None
        self._package_hooks: list[tuple[int, int, PackageHook]] = []
        self._unpackage_hooks: list[tuple[int, int, PackageHook]] = []
        self._step_hooks: dict[str, list[tuple[int, int, StepHook]]] = {}
        self._hook_order = 0
        self._closed = False
        self._loop: AggregatorLoop | None = None
        self._link: CollaboratorLink | None = None
        transport: dict[str, Any] = {
            "options": socket_options,
            "limits": self.limits,
            "codec": codec,
            "curve": curve,
            "stream": self.stream,
        }
        if fed_props.aggregator:
            group = AggregatorGroup(fed_props, **transport)
            self._loop = AggregatorLoop(self, group, idle_interval=idle_interval)
        else:
            self._link = CollaboratorLink(fed_props, **transport)
            self.pipe = CollaboratorPipe(self._link, fed_props.aggregator_name)
            self.pipes.append(self.pipe)
        _live.add(self)

    # -- identity ------------------------------------------------------------
    @property
    def role(self) -> str:
        """``'aggregator'`` or ``'collaborator'``."""
        return self.fed_props.role

    @property
    def aggregator(self) -> bool:
        """True on the group's aggregator."""
        return self.fed_props.aggregator

    @property
    def collaborator(self) -> bool:
        """True on a collaborator."""
        return self.fed_props.collaborator

    @property
    def nick_name(self) -> str:
        """This node's nick name."""
        return self.fed_props.nick_name

    @property
    def anti_nick_name(self) -> str | None:
        """The nick name of the peer at the other end of the current pipe."""
        return self.pipe.nick_name if self.pipe else None

    @property
    def is_offline(self) -> bool:
        """True when the current pipe is offline."""
        return self.pipe is None or self.pipe.is_offline

    # -- hooks ---------------------------------------------------------------
    def _next_order(self) -> int:
        self._hook_order += 1
        return self._hook_order

    def register_package_hook(self, nice: int, package_hook: PackageHook) -> None:
        """Transform outgoing data: ``hook(state, p) -> state`` per tensor, lower ``nice`` first."""
        self._package_hooks.append((nice, self._next_order(), package_hook))
        self._package_hooks.sort(key=lambda h: h[:2])

    def register_unpackage_hook(self, nice: int, unpackage_hook: PackageHook) -> None:
        """Transform received data: ``hook(state, p) -> state`` per tensor, lower ``nice`` first."""
        self._unpackage_hooks.append((nice, self._next_order(), unpackage_hook))
        self._unpackage_hooks.sort(key=lambda h: h[:2])

    def register_step_hook(
        self, nice: int, step_hook: StepHook, step_name: str | None = None
    ) -> None:
        """Run ``step_hook(maintainer, *args)`` at ``step_name`` of the aggregator's loop.

        Hooks of ``before_download``/``before_upload`` return False to refuse
        (the request is parked and looked at again later), True to accept.
        """
        step_name = step_name or getattr(step_hook, "step_name", None)
        if step_name not in steps.STEP_NAMES:
            raise ConfigError(
                f"unknown step name {step_name!r}; expected one of {steps.STEP_NAMES}"
            )
        hooks = self._step_hooks.setdefault(step_name, [])
        hooks.append((nice, self._next_order(), step_hook))
        hooks.sort(key=lambda h: h[:2])

    def run_step_hooks(self, step_name: str, *args: Any) -> bool | None:
        """Run the hooks of ``step_name``: False if any refused, True if any accepted."""
        self.current_step = step_name
        outputs = [hook(self, *args) for _, _, hook in self._step_hooks.get(step_name, ())]
        if any(out is False for out in outputs):
            return False
        if any(out is True for out in outputs):
            return True
        return None

    def apply_hooks(
        self, data: Mapping[str, dict[str, Tensor]], *, unpackage: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Run the (un)package hooks on copies of ``data``'s per-tensor dicts."""
        hooks = self._unpackage_hooks if unpackage else self._package_hooks
        out: dict[str, dict[str, Tensor]] = {}
        for name, state in data.items():
            state = dict(state)
            p = self.state_dict.get(name)
            if p is not None:
                for _, _, hook in hooks:
                    state = hook(state, p)
            out[name] = state
        return out

    # -- state ---------------------------------------------------------------
    def update_version(self, version: int | None = None) -> None:
        """Set the version (or add one); it travels in ``meta['version']``."""
        self.version = self.version + 1 if version is None else int(version)
        self.meta["version"] = self.version
        if self._loop is not None:
            self._loop.version_changed()

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Add or replace tensors to exchange."""
        self.state_dict.update(state_dict)
        if self._loop is not None:
            self._loop.invalidate()

    def package(self, optim_list: Any = None, state_keys: list[str] | None = None) -> None:
        """Collect ``param`` plus optimizer state per tensor into ``packaged_data``.

        The live tensor always wins over an optimizer state entry of the same
        name (an aggregation may leave a stale ``param`` in the optimizer).
        """
        self.packaged_data = {}
        optims = _as_list(optim_list)
        for name, p in self.state_dict.items():
            entry: dict[str, Tensor] = {}
            for optim in optims:
                state = optim.state.get(p) if hasattr(optim.state, "get") else None
                if not state:
                    continue
                keys = state_keys if state_keys is not None else list(state)
                for key in keys:
                    value = state.get(key)
                    if isinstance(value, Tensor):
                        entry[key] = value
            entry["param"] = p
            self.packaged_data[name] = entry
        if self._loop is not None:
            self._loop.invalidate()

    @torch.no_grad()
    def unpackage(self, optim_list: Any = None, state_keys: list[str] | None = None) -> None:
        """Copy the received ``param`` into each tensor and optimizer state into ``optim_list``."""
        if not self.data:
            raise ConfigError(f"{self.nick_name}: nothing to unpackage; download with step() first")
        optims = _as_list(optim_list)
        for name, p in self.state_dict.items():
            entry = self.data.get(name)
            if entry is None or "param" not in entry:
                raise ProtocolError(f"received data has no 'param' for {name!r}")
            if entry["param"].data_ptr() != p.data_ptr():  # else: streamed in place
                p.copy_(entry["param"])
            for optim in optims:
                keys = state_keys if state_keys is not None else [k for k in entry if k != "param"]
                for key in keys:
                    if key in entry:
                        optim.state[p][key] = entry[key].clone()

    def _check_names(self, data: Mapping[str, Mapping[str, Tensor]], sender: str) -> str | None:
        missing = [n for n in self.state_dict if n not in data or "param" not in data[n]]
        if missing:
            return f"data from {sender!r} lacks {len(missing)} tensors, e.g. {missing[:3]}"
        extra = [n for n in data if n not in self.state_dict]
        if extra:
            return f"data from {sender!r} has {len(extra)} unknown tensors, e.g. {extra[:3]}"
        return None

    def _check_shapes(self, data: Mapping[str, Mapping[str, Tensor]], sender: str) -> str | None:
        for name, p in self.state_dict.items():
            got = data[name]["param"]
            if got.shape != p.shape:
                return (
                    f"data from {sender!r}: {name!r} has shape {list(got.shape)}, "
                    f"expected {list(p.shape)}"
                )
        return None

    def receive(
        self, data: Mapping[str, Mapping[str, Tensor]], sender: str
    ) -> dict[str, dict[str, Tensor]]:
        """Check received tensors, run the unpackage hooks on them, check the result.

        Names come first (every local tensor has a ``param``, nothing
        unknown), shapes only after the hooks: a compressed ``param`` may take
        its shape only when decoded.

        Raises ``ProtocolError`` naming the problem: a missing or unknown
        tensor, a hook that failed on the data (a decoder refusing malformed
        input, or any hook tripping over it), or a shape that differs from the
        local tensor once decoded. Nothing of refused data is kept.
        """
        problem = self._check_names(data, sender)
        if problem:
            raise ProtocolError(problem)
        try:
            decoded = self.apply_hooks({k: dict(v) for k, v in data.items()}, unpackage=True)
        except ProtocolError as exc:
            raise ProtocolError(f"data from {sender!r}: {exc}") from exc
        except Exception as exc:  # a hook fed hostile data must not take the node down
            raise ProtocolError(
                f"data from {sender!r}: unpackage hooks failed ({type(exc).__name__}: {exc})"
            ) from exc
        problem = self._check_shapes(decoded, sender)
        if problem:
            raise ProtocolError(problem)
        return decoded

    def clear(self) -> None:
        """Forget the received uploads (``data_list``, ``meta_list``)."""
        self.data_list.clear()
        self.meta_list.clear()

    # -- stepping ------------------------------------------------------------
    def step(
        self,
        upload: bool = True,
        download: bool = True,
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> bool:
        """One exchange with the group.

        Collaborator: upload (PUSH) the packaged data if ``upload``, then
        download (PULL) the model if ``download``; blocks until answered.
        Aggregator: serve and receive until a step hook calls ``manual_stop``.
        Raises ``PeerTimeout`` when ``timeout`` (or the Maintainer's) passes.
        """
        if self._closed:
            raise ConfigError(f"{self.nick_name}: the maintainer is closed")
        timeout = self.timeout if timeout is None else timeout
        if self._loop is not None:
            return self._loop.run(timeout)
        try:
            return self._collaborator_step(upload, download, meta, timeout)
        except PeerTimeout as exc:
            # Each request gets only what is left of the step's time: report
            # the step's timeout, not the remainder the last request had.
            if timeout is None or exc.seconds == timeout:
                raise
            raise PeerTimeout(exc.peer, timeout, exc.what) from exc

    def _collaborator_step(
        self, upload: bool, download: bool, meta: dict[str, Any] | None, timeout: float | None
    ) -> bool:
        pipe = self.pipe
        assert isinstance(pipe, CollaboratorPipe)
        deadline = None if timeout is None else time.monotonic() + timeout
        out_meta = Meta(meta if meta is not None else self.meta).to_json_dict()
        if upload:
            if not self.packaged_data:
                self.package()
            tensors = self.apply_hooks(self.packaged_data, unpackage=False)
            pipe.request(
                "PUSH",
                meta=out_meta,
                version=max(self.version, 0),
                tensors=tensors,
                timeout=_left(deadline),
            )
        if download:
            reply = pipe.request(
                "PULL",
                meta=out_meta,
                version=max(self.version, 0),
                timeout=_left(deadline),
                destination=self._own_tensor if self.download_in_place else None,
            )
            self.data = self.receive(reply.tensors, pipe.nick_name)
            self.meta = Meta(reply.meta)
            pipe.meta = Meta(reply.meta)
            if meta is not None:
                meta.update(self.meta)
        return True

    def _own_tensor(self, desc: TensorDesc) -> Tensor | None:
        """Where a streamed download of ``desc`` may land: the local tensor it replaces."""
        return self.state_dict.get(desc.key) if desc.field == "param" else None

    def discard(self, reason: str) -> None:
        """From a step hook: refuse the current pipe's request for good.

        The collaborator's ``step()`` raises ``RemoteError`` with code
        ``'discarded'`` and ``reason``; nothing of the request is kept.
        """
        if self._loop is None or self.pipe is None:
            raise ConfigError("discard() is for an aggregator's step hooks")
        self._loop.discard(self.pipe, reason)  # type: ignore[arg-type]

    @property
    def stats(self) -> dict[str, int]:
        """Counters: bytes in/out, and on an aggregator messages, errors, parked requests, encodes."""
        pipes = self.all_pipes()
        out = {
            "bytes_in": sum(p.bytes_in for p in pipes),
            "bytes_out": sum(p.bytes_out for p in pipes),
        }
        if self._loop is not None:
            out.update(
                messages_in=self._loop.group.messages_in,
                errors=self._loop.group.errors,
                parked=self._loop.parked,
                encodes=self._loop.encodes,
            )
        return out

    def all_pipes(self) -> list[Pipe]:
        """Every pipe of the group, online or not (the aggregator's roster)."""
        if self._loop is not None:
            return list(self._loop.group.roster.values())
        return list(self.pipes)

    def manual_stop(self) -> None:
        """End the aggregator's current ``step()`` after the hook that calls it."""
        if self._loop is not None:
            self._loop.stopped = True

    def wake_at(self, when: float) -> None:
        """Ask the aggregator's loop to run the hooks at ``time.monotonic()`` ``when``."""
        if self._loop is not None:
            self._loop.wake_at(when)

    @property
    def stopped(self) -> bool:
        """True once ``manual_stop`` ended the current step."""
        return self._loop.stopped if self._loop is not None else False

    def killed(self) -> None:
        """Close every pipe (alias of :meth:`close`, as in OpenFed)."""
        self.close()

    def close(self, *, final: bool = False) -> None:
        """Say BYE to the peers and close the sockets (idempotent).

        On an aggregator, ``final=True`` tells the collaborators that the
        federation is over; otherwise they wait for it to come back.
        """
        if self._closed:
            return
        self._closed = True
        if self._loop is not None:
            self._loop.group.close(final=final)
        for pipe in self.pipes:
            if isinstance(pipe, CollaboratorPipe):
                pipe.close()
        _live.discard(self)

    def __enter__(self) -> Maintainer:
        push_maintainer(self)
        return self

    def __exit__(self, *exc: object) -> None:
        pop_maintainer(self)

    def __repr__(self) -> str:
        head = ("role", "nick_name", "pipes", "version")
        row = (self.role, self.nick_name, str(len(self.pipes)), str(self.version))
        widths = [max(len(h), len(v)) + 2 for h, v in zip(head, row, strict=True)]
        sep = "+" + "+".join("-" * w for w in widths) + "+"

        def line(cells: tuple[str, ...]) -> str:
            return "|" + "|".join(c.center(w) for c, w in zip(cells, widths, strict=True)) + "|"

        return "\n".join(["<zmqfed> Maintainer", sep, line(head), sep, line(row), sep])


def _as_list(optim_list: Any) -> list[Any]:
    if optim_list is None:
        return []
    return list(optim_list) if isinstance(optim_list, (list, tuple)) else [optim_list]


def _left(deadline: float | None) -> float | None:
    return None if deadline is None else max(0.001, deadline - time.monotonic())


@atexit.register
def _close_all() -> None:
    """Close live maintainers at exit so final ACKs and BYEs are flushed (bounded by LINGER)."""
    for maintainer in list(_live):
        try:
            maintainer.close()
        except Exception:  # pragma: no cover - best effort at interpreter exit
            log.debug("closing %s at exit failed", maintainer.nick_name, exc_info=True)
    shutdown()
