"""``Maintainer``: bridges federated algorithms and the communication layer.

A Maintainer serves one federated group.  It holds the state exchanged
(``state_dict``, ``packaged_data``, what was received), the hooks, and the
version; the work of each role is done by its side over the group's
transport: :class:`~zmqfed.core.collaborator_side.CollaboratorSide` uploads
and downloads, blocking until the aggregator answers;
:class:`~zmqfed.core.aggregator_side.AggregatorSide` runs the aggregator's
loop, where step hooks decide what happens and when the step ends
(``manual_stop``).  The transport runs on real sockets by default, or on an
in-memory network (``network=MemoryNetwork()``) in unit tests.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from zmqfed.core.aggregator_side import AggregatorSide
from zmqfed.core.collaborator_side import CollaboratorSide
from zmqfed.core.context import pop_maintainer, push_maintainer
from zmqfed.core.contracts import (
    PackageHook,
    StepContext,
    StepHook,
    StepResult,
    UploadWrapper,
    contract_keys,
    optim_as_list,
)
from zmqfed.core.hooks import HookRegistry
from zmqfed.core.packaging import install_state, package_state
from zmqfed.core.received import check_received
from zmqfed.errors import ConfigError
from zmqfed.federated import (
    AggregatorTransport,
    CollaboratorTransport,
    FederatedProperties,
    Network,
    Pipe,
    SocketOptions,
    default_network,
)
from zmqfed.federated.collaborator_link import Cycle
from zmqfed.federated.ports import Port
from zmqfed.federated.security import Curve
from zmqfed.federated.sockets import close_at_exit
from zmqfed.meta import Meta
from zmqfed.wire import DEFAULT_LIMITS, DEFAULT_STREAM, Envelope, Limits, StreamConfig

__all__ = ["Maintainer"]

log = logging.getLogger(__name__)


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
    upload_fields:
        Aggregator: optimizer-state fields uploads may carry besides
        ``param`` (:attr:`upload_fields`; ``package(fed_optim)`` adds the
        optimizers' own).
    download_in_place:
        A collaborator receives a streamed model (above ``stream.threshold``,
        or with a tensor above ``stream.tensor_threshold``) straight into its
        own ``state_dict`` tensors (same dtype and shape): no second copy,
        and ``unpackage`` has nothing left to copy.  The tensors then hold
        the download as soon as ``step()`` returns, before ``unpackage``.
    partial:
        A collaborator whose ``state_dict`` is a subset of the aggregator's
        model (its trainable tensors, e.g.
        :func:`zmqfed.partial.trainable_state_dict`, or ``peft`` LoRA
        adapters): it declares these names when it says HELLO, downloads
        only them and uploads exactly them; the aggregator refuses an upload
        that carries another set, and the rules average each tensor over the
        updates that carry it (docs/protocol.md §5).
    link_monitor:
        Collaborator: watch the connection with a socket monitor (the
        default).  ``False`` saves two of the three sockets a collaborator
        opens, for thousands of collaborators in one process; lost
        connections are then noticed only by silence (docs/zeromq.md §26).

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
        network: Network | None = None,
        upload_fields: Iterable[str] = (),
        link_monitor: bool = True,
        partial: bool = False,
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
        self.limits = limits  # allow_pickle needs CURVE: the transports refuse it otherwise
        self.codec = codec
        #: The node's CurveZMQ keys, or None (hooks may use them, e.g. for key agreement).
        self.curve = curve
        self.download_in_place = download_in_place
        if partial and fed_props.aggregator:
            raise ConfigError(
                "partial=True is for collaborators: an aggregator holds the whole model "
                "and serves each collaborator the subset it declared"
            )
        #: A collaborator exchanging only its ``state_dict``'s names (a subset of the model).
        self.partial = partial
        self.state_dict: dict[str, Tensor] = dict(state_dict) if state_dict is not None else {}
        self.version = 0
        self.meta = Meta()
        self.meta_list: list[Meta] = []
        #: The data just received: name -> field ('param', optimizer state) -> tensor.
        self.data: dict[str, dict[str, Tensor]] = {}
        #: Received uploads (aggregator), keyed by this node's own tensors as in OpenFed.
        self.data_list: list[dict[Tensor, dict[str, Tensor]]] = []
        #: Who sent each entry of ``data_list`` / ``meta_list`` (one upload per
        #: member and version: :mod:`zmqfed.federated.aggregator_transport`).
        self.sender_list: list[str] = []
        #: What the next upload (or an aggregator's next DATA) carries.
        self.packaged_data: dict[str, dict[str, Tensor]] = {}
        #: Aggregator: the fields an upload may carry besides ``param`` (after the
        #: unpackage hooks); grows with the upload keys of the optimizers given
        #: to :meth:`package`.  Anything else is refused before it is counted.
        self.upload_fields: set[str] = set(upload_fields or ())
        #: Aggregation features installed here (``'fedbuff'``, ``'central_dp'``,
        #: ``'secure_aggregation'``); those that cannot combine refuse each
        #: other in :meth:`add_feature`.
        self.features: set[str] = set()
        #: The peers of the current step (aggregator), or the one pipe (collaborator).
        self.pipes: list[Pipe] = []
        #: Aggregator: the collaborators a sampling policy invited to the current
        #: step (``zmqfed.functional.client_sampling``); None when everyone is.
        self.cohort: list[str] | None = None
        #: The pipe the running step hook is about (OpenFed's "current pipe").
        self.pipe: Pipe | None = None
        #: The step point being run.
        self.current_step: str | None = None
        #: Metrics hooks report about the current round (e.g. DP's ``epsilon``);
        #: ``API`` adds them to the round's record and clears them.
        self.round_metrics: dict[str, Any] = {}
        #: Why training must end after the current round (:meth:`end_training`), or None.
        self.end_reason: str | None = None
        self._hooks = HookRegistry()
        self._closed = False
        transport: dict[str, Any] = {
            "network": network or default_network(),
            "options": socket_options,
            "limits": self.limits,
            "codec": codec,
            "curve": curve,
            "stream": self.stream,
        }
        self._side: AggregatorSide | CollaboratorSide
        if fed_props.aggregator:
            group = AggregatorTransport(
                fed_props, served=self._served, upload_names=self.state_dict.keys, **transport
            )
            self._side = AggregatorSide(self, group, idle_interval=idle_interval)
        else:
            declared = (lambda: list(self.state_dict)) if partial else None
            link = CollaboratorTransport(
                fed_props, monitor=link_monitor, declared=declared, **transport
            )
            self._side = CollaboratorSide(self, link)
            self.pipe = link.pipe
            self.pipes.append(link.pipe)
        close_at_exit(self)  # final ACKs and BYEs are flushed at interpreter exit

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
        """The nick name of the peer at the other end of the current pipe (OpenFed's name)."""
        return self.pipe.nick_name if self.pipe else None

    @property
    def is_offline(self) -> bool:
        """True when the current pipe is offline."""
        return self.pipe is None or self.pipe.is_offline

    # -- hooks ---------------------------------------------------------------
    def register_package_hook(self, nice: int, package_hook: PackageHook) -> None:
        """Transform outgoing data: ``hook(state, p[, name=]) -> state`` per tensor, lower ``nice`` first."""
        self._hooks.add_package(nice, package_hook)

    def register_unpackage_hook(self, nice: int, unpackage_hook: PackageHook) -> None:
        """Transform received data: ``hook(state, p[, name=]) -> state`` per tensor, lower ``nice`` first."""
        self._hooks.add_unpackage(nice, unpackage_hook)

    def register_step_hook(self, nice: int, step_hook: Any, step_name: str | None = None) -> None:
        """Run OpenFed-style ``step_hook(maintainer[, flag])`` at step point ``step_name``.

        The hook reads the peer from ``maintainer.pipe``; ``flag`` is passed
        at the points after an exchange.  Hooks at ``upload_received`` /
        ``download_requested`` (OpenFed: ``before_download`` /
        ``before_upload``) return False to park the request, True to accept.
        New code may prefer :meth:`on`, whose hooks get the peer as an argument.
        """
        step_name = step_name or getattr(step_hook, "step_name", None)
        if not callable(step_hook):
            raise ConfigError(f"a step hook must be callable, got {step_hook!r}")

        def openfed_shape(ctx: StepContext) -> bool | None:
            if ctx.flag is None:
                return step_hook(ctx.maintainer)
            return step_hook(ctx.maintainer, ctx.flag)

        self._hooks.add_step(step_name, openfed_shape, nice)  # type: ignore[arg-type]

    def add_feature(self, name: str, *, excludes: Iterable[str] = (), why: str = "") -> None:
        """Record that feature ``name`` is installed; ``ConfigError`` if one of ``excludes`` is."""
        clash = sorted(self.features.intersection(excludes))
        if clash:
            raise ConfigError(
                f"{name} cannot run with {' and '.join(clash)} on {self.nick_name!r}"
                + (f": {why}" if why else "")
            )
        self.features.add(name)

    def register_upload_wrapper(self, wrapper: UploadWrapper) -> None:
        """Collaborator: run ``wrapper(maintainer, tensors, meta, send)`` around every upload.

        The wrapper gets the whole upload (after the package hooks) and the
        PUSH's meta, and calls ``send(tensors, meta)`` once with what to
        upload instead; before and after, it may talk to the aggregator with
        :meth:`exchange`.  Wrappers registered first run outermost.
        """
        if not isinstance(self._side, CollaboratorSide):
            raise ConfigError("upload wrappers run on a collaborator")
        if not callable(wrapper):
            raise ConfigError(f"an upload wrapper must be callable, got {wrapper!r}")
        self._side.wrappers.append(wrapper)

    def exchange(
        self,
        topic: str,
        meta: dict[str, Any] | None = None,
        tensors: dict[str, dict[str, Tensor]] | None = None,
        timeout: float | None = None,
    ) -> Envelope:
        """Collaborator: one more request/answer with the aggregator, beside upload and download.

        Sends ASK with ``meta`` (plus ``topic``) and ``tensors`` and blocks
        until a hook at the aggregator's ``exchange_requested`` point
        answers; returns the REPLY (its ``meta`` and ``tensors``).  Raises
        ``RemoteError`` (code ``unexpected``) when no hook there answers
        ``topic``, and ``PeerTimeout`` after ``timeout`` (default: the
        Maintainer's).
        """
        if not isinstance(self._side, CollaboratorSide):
            raise ConfigError("exchange() is for collaborators; aggregators answer in hooks")
        if self._closed:
            raise ConfigError(f"{self.nick_name}: the maintainer is closed")
        timeout = self.timeout if timeout is None else timeout
        return self._side.exchange(topic, meta, tensors, timeout)

    def on(self, point: str, hook: StepHook, nice: int = 50) -> None:
        """Run ``hook(ctx)`` at step point ``point``; ``ctx`` is a :class:`StepContext`.

        >>> maintainer.on(
        ...     step_points.upload_handled, lambda ctx: print(ctx.pipe.nick_name)
        ... )  # doctest: +SKIP
        """
        self._hooks.add_step(point, hook, nice)

    def run_step_point(
        self, point: str, pipe: Pipe | None, flag: bool | None = None
    ) -> bool | None:
        """Run the hooks of ``point`` about ``pipe``: False if any refused, True if any accepted."""
        self.current_step = point
        self.pipe = pipe
        return self._hooks.run_step(StepContext(self, point, pipe, flag))

    def apply_hooks(
        self, data: Mapping[str, dict[str, Tensor]], *, unpackage: bool
    ) -> dict[str, dict[str, Tensor]]:
        """Run the (un)package hooks on copies of ``data``'s per-tensor dicts."""
        return self._hooks.apply(data, self.state_dict, unpackage=unpackage)

    # -- state ---------------------------------------------------------------
    def update_version(self, version: int | None = None) -> None:
        """Set the version (or add one); it travels in ``meta['version']``."""
        self.version = self.version + 1 if version is None else int(version)
        self.meta["version"] = self.version
        self._side.version_changed()

    def load_state_dict(self, state_dict: Mapping[str, Tensor]) -> None:
        """Add or replace tensors to exchange."""
        self.state_dict.update(state_dict)
        self._side.model_changed()

    def package(self, optim_list: Any = None, state_keys: list[str] | None = None) -> None:
        """Collect ``param`` plus optimizer state per tensor into ``packaged_data``.

        Which optimizer state travels is each optimizer's contract
        (:func:`zmqfed.core.contracts.contract_keys`): a collaborator sends its
        ``upload_keys`` (SCAFFOLD's ``c``, elastic's ``importance``), an
        aggregator its ``download_keys``; plain torch optimizers keep their
        state (momentum, Adam's moments) local.  ``state_keys`` overrides the
        contract.  On an aggregator, the upload keys of ``optim_list`` are
        also what uploads may carry besides ``param`` (:attr:`upload_fields`).

        The live tensor always wins over an optimizer state entry of the same
        name (an aggregation may leave a stale ``param`` in the optimizer).
        """
        optims = optim_as_list(optim_list)
        if self.aggregator:
            for optim in optims:
                self.upload_fields.update(contract_keys(optim, "upload"))
        direction = "download" if self.aggregator else "upload"
        self.packaged_data = package_state(self.state_dict, optims, direction, state_keys)
        self._side.model_changed()

    @torch.no_grad()
    def unpackage(self, optim_list: Any = None, state_keys: list[str] | None = None) -> None:
        """Copy the received ``param`` into each tensor, and optimizer state into ``optim_list``.

        Only the state keys an optimizer accepts from the other side are
        written (its ``download_keys`` on a collaborator, ``upload_keys`` on
        an aggregator; ``state_keys`` overrides): a download cannot plant
        state an optimizer never asked for.
        """
        if not self.data:
            raise ConfigError(f"{self.nick_name}: nothing to unpackage; download with step() first")
        direction = "upload" if self.aggregator else "download"
        install_state(self.state_dict, self.data, optim_as_list(optim_list), direction, state_keys)

    def _served(self) -> dict[str, dict[str, Tensor]]:
        """What an aggregator serves: the packaged data, else its state, after the package hooks."""
        source = self.packaged_data or {n: {"param": p} for n, p in self.state_dict.items()}
        return self.apply_hooks(source, unpackage=False)

    def receive(
        self,
        data: Mapping[str, Mapping[str, Tensor]],
        sender: str,
        names: Collection[str] | None = None,
    ) -> dict[str, dict[str, Tensor]]:
        """Check received tensors, run the unpackage hooks on them, check the result.

        ``names``: the subset of ``state_dict`` the sender declared it
        exchanges (None: all of it); the data must carry exactly those.
        Raises ``ProtocolError`` naming the problem; nothing of refused data
        is kept (:func:`zmqfed.core.received.check_received`).
        """
        own = self.state_dict
        if names is not None:
            own = {n: p for n, p in own.items() if n in names}
        return check_received(
            data,
            own,
            lambda d: self.apply_hooks(d, unpackage=True),
            sender,
            fields=self.upload_fields if self.aggregator else None,
        )

    def record_upload(self, data: dict[str, dict[str, Tensor]], meta: Meta, sender: str) -> None:
        """Keep a received (validated) upload: ``data``, ``data_list``, ``meta_list``, ``sender_list``."""
        self.data = data
        # keyed by this node's tensors: tied names (one tensor) give one entry,
        # and a partial upload only the tensors it carries
        self.data_list.append({p: data[n] for n, p in self.state_dict.items() if n in data})
        self.meta_list.append(meta)
        self.sender_list.append(sender)

    def keep_uploads(self, indices: Iterable[int]) -> None:
        """Keep only the received uploads at ``indices`` (in every list)."""
        keep = list(indices)
        self.data_list[:] = [self.data_list[i] for i in keep]
        self.meta_list[:] = [self.meta_list[i] for i in keep]
        self.sender_list[:] = [self.sender_list[i] for i in keep]

    def clear(self) -> None:
        """Forget the received uploads (``data_list``, ``meta_list``, ``sender_list``)."""
        self.data_list.clear()
        self.meta_list.clear()
        self.sender_list.clear()

    # -- stepping ------------------------------------------------------------
    def step(
        self,
        upload: bool = True,
        download: bool = True,
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> StepResult:
        """One exchange with the group; returns what it did (a true :class:`StepResult`).

        Collaborator: upload (PUSH) the packaged data if ``upload``, then
        download (PULL) the model if ``download``; blocks until answered.
        Aggregator: serve and receive until a step hook calls ``manual_stop``.
        Raises ``PeerTimeout`` when ``timeout`` (or the Maintainer's) passes.
        """
        if self._closed:
            raise ConfigError(f"{self.nick_name}: the maintainer is closed")
        timeout = self.timeout if timeout is None else timeout
        if isinstance(self._side, AggregatorSide):
            return self._side.step(timeout)
        return self._side.step(upload, download, meta, timeout)

    def step_cycle(
        self,
        upload: bool = True,
        download: bool = True,
        meta: dict[str, Any] | None = None,
        timeout: float | None = None,
    ) -> Cycle[StepResult]:
        """A collaborator's :meth:`step` as a cycle, for a :class:`~zmqfed.federated.Multiplexer`.

        The generator yields where ``step()`` would block and returns its
        :class:`StepResult`; ``step()`` is this cycle driven on the
        Maintainer's own port.
        """
        if self._closed:
            raise ConfigError(f"{self.nick_name}: the maintainer is closed")
        if not isinstance(self._side, CollaboratorSide):
            raise ConfigError("step_cycle() is a collaborator's; an aggregator runs step()")
        timeout = self.timeout if timeout is None else timeout
        return self._side.step_cycle(upload, download, meta, timeout)

    @property
    def port(self) -> Port:
        """The port of this node in the group (a collaborator's DEALER, an aggregator's ROUTER)."""
        return (
            self._side.transport.port
            if isinstance(self._side, AggregatorSide)
            else self._side.transport.link.port
        )

    def discard(self, reason: str) -> None:
        """From a step hook: refuse the current pipe's request for good.

        The collaborator's ``step()`` raises ``RemoteError`` with code
        ``'discarded'`` and ``reason``; nothing of the request is kept.
        """
        self._side.discard(self.pipe, reason)

    @property
    def stats(self) -> dict[str, Any]:
        """Counters: tensor bytes in/out; messages and bytes by kind (``messages_received``,
        ``bytes_received``, ``messages_sent``, ``bytes_sent``), chunks; on an aggregator
        messages, errors (refusals by code), parked requests, encodes, joins, departures,
        uploads by outcome; on a collaborator resent requests, disconnects, reconnects."""
        pipes = self.all_pipes()
        out: dict[str, Any] = {
            "bytes_in": sum(p.bytes_in for p in pipes),
            "bytes_out": sum(p.bytes_out for p in pipes),
        }
        out.update(self._side.stats())
        return out

    def all_pipes(self) -> list[Pipe]:
        """Every pipe of the group, online or not (the aggregator's roster)."""
        return self._side.pipes()

    def end_training(self, reason: str) -> None:
        """From a hook: ask the round runner to stop after the current round.

        ``API`` logs ``reason`` and runs no further round (a privacy budget
        spent, for instance); the first reason given is kept.
        """
        if self.end_reason is None:
            self.end_reason = str(reason)

    def manual_stop(self) -> None:
        """End the aggregator's current ``step()`` after the hook that calls it."""
        self._side.manual_stop()

    def wake_at(self, when: float) -> None:
        """Ask the aggregator's loop to run the hooks at ``time.monotonic()`` ``when``."""
        self._side.wake_at(when)

    @property
    def stopped(self) -> bool:
        """True once ``manual_stop`` ended the current step."""
        return isinstance(self._side, AggregatorSide) and self._side.stopped

    @property
    def uploads_per_member(self) -> int:
        """Uploads one collaborator process may have counted per version (aggregator; 1).

        More than one is for a process that plays several clients in turn
        (download, train, upload, again within one version), as OpenFed's
        examples do; ``count_step(K)`` with K above the group's collaborators
        raises it to what K needs.  A retry of the same request is never
        counted twice, and another process of the member is still refused.
        """
        if not isinstance(self._side, AggregatorSide):
            raise ConfigError("uploads_per_member is an aggregator's setting")
        return self._side.transport.members.uploads_per_member

    @uploads_per_member.setter
    def uploads_per_member(self, value: int) -> None:
        if not isinstance(self._side, AggregatorSide):
            raise ConfigError("uploads_per_member is an aggregator's setting")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"uploads_per_member must be a positive int, got {value!r}")
        self._side.transport.members.uploads_per_member = value

    def killed(self) -> None:
        """Close every pipe (alias of :meth:`close`, as in OpenFed)."""
        self.close()

    def close(self, *, final: bool = False) -> None:
        """Say BYE to the peers and close the transport (idempotent).

        On an aggregator, ``final=True`` tells the collaborators that the
        federation is over; otherwise they wait for it to come back.
        """
        if self._closed:
            return
        self._closed = True
        self._side.close(final=final)

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
