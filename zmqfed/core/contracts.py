"""The contracts between the Maintainer and the code it calls: hooks, step results, optimizers.

Package and unpackage hooks transform one tensor's state on its way out or
in; step hooks run at the points of an aggregator's step
(:mod:`zmqfed.core.step_points`) and decide what happens there.  OpenFed's
call shapes keep working: ``hook(state, p)`` for (un)package hooks and
``hook(maintainer)`` (``hook(maintainer, flag)`` after an exchange) for step
hooks registered with ``register_step_hook``.  New code gets more: package
hooks may take the tensor's ``name``, and step hooks registered with
``Maintainer.on`` receive a :class:`StepContext` naming the peer they act on.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from zmqfed.core.maintainer import Maintainer
    from zmqfed.federated import Pipe
    from zmqfed.wire import Envelope

__all__ = [
    "PackageHook",
    "SendUpload",
    "StepContext",
    "StepHook",
    "StepResult",
    "UploadWrapper",
    "as_context",
    "contract_keys",
    "optim_as_list",
    "takes_name",
]


class _PlainPackageHook(Protocol):
    def __call__(self, state: dict[str, Tensor], p: Tensor, /) -> dict[str, Tensor]: ...


class _NamedPackageHook(Protocol):
    def __call__(
        self, state: dict[str, Tensor], p: Tensor, /, *, name: str
    ) -> dict[str, Tensor]: ...


#: ``hook(state, p[, name=...]) -> state``: transform one tensor's fields.
#: ``state`` maps field names (``'param'``, optimizer state keys) to tensors;
#: ``p`` is the node's own tensor of that name; a hook with a ``name``
#: parameter also receives the tensor's name in the state dict.
PackageHook = _PlainPackageHook | _NamedPackageHook


@dataclass(frozen=True)
class StepContext:
    """What a step hook acts on.

    Attributes
    ----------
    maintainer:
        The aggregator's Maintainer.
    point:
        The step point being run (:mod:`zmqfed.core.step_points`).
    pipe:
        The peer the point is about (None at points about the whole step).
    flag:
        After an exchange (``upload_accepted``, ``download_served``,
        ``peer_left``): whether it succeeded.
    """

    maintainer: Maintainer
    point: str
    pipe: Pipe | None = None
    flag: bool | None = None


class StepHook(Protocol):
    """``hook(ctx) -> bool | None``: a step hook registered with ``Maintainer.on``.

    At ``upload_received`` and ``download_requested`` a hook returns False to
    refuse for now (the request is parked), True to accept; None leaves the
    decision to other hooks.
    """

    def __call__(self, ctx: StepContext, /) -> bool | None: ...


class SendUpload(Protocol):
    """``send(tensors, meta) -> Envelope``: send an upload on (to the next wrapper, or the PUSH)."""

    def __call__(
        self, tensors: dict[str, dict[str, Tensor]], meta: dict[str, Any], /
    ) -> Envelope: ...


class UploadWrapper(Protocol):
    """``wrapper(maintainer, tensors, meta, send) -> Envelope``: around a collaborator's upload.

    Registered with ``Maintainer.register_upload_wrapper``, it receives the
    whole upload (after the package hooks) and the meta of the PUSH, and
    must call ``send`` once with what to upload instead; it may talk to the
    aggregator before and after (``maintainer.exchange``).  It returns what
    ``send`` returned (the ACK).
    """

    def __call__(
        self,
        maintainer: Maintainer,
        tensors: dict[str, dict[str, Tensor]],
        meta: dict[str, Any],
        send: SendUpload,
        /,
    ) -> Envelope: ...


@dataclass(frozen=True)
class StepResult:
    """What one ``Maintainer.step()`` did; true when it completed.

    Attributes
    ----------
    uploads:
        Uploads received (aggregator) or sent (collaborator).
    downloads:
        Downloads served (aggregator) or received (collaborator).
    parked:
        Requests told to wait during the step (aggregator).
    """

    uploads: int = 0
    downloads: int = 0
    parked: int = 0

    def __bool__(self) -> bool:
        return True


def as_context(arg: StepContext | Maintainer) -> StepContext:
    """A step hook's argument as a :class:`StepContext`.

    Lets one hook serve both registrations: ``Maintainer.on`` passes the
    context, OpenFed's ``register_step_hook`` the Maintainer (whose ``pipe``
    and ``current_step`` name the peer and the point being run).
    """
    if isinstance(arg, StepContext):
        return arg
    return StepContext(arg, arg.current_step or "", arg.pipe)


def takes_name(hook: Callable[..., Any]) -> bool:
    """Whether an (un)package hook accepts the tensor's ``name`` as a keyword."""
    try:
        params = inspect.signature(hook).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: the OpenFed shape
        return False
    return any(
        p.kind is inspect.Parameter.VAR_KEYWORD
        or (p.name == "name" and p.kind is not inspect.Parameter.POSITIONAL_ONLY)
        for p in params
    )


def contract_keys(optim: Any, direction: str) -> tuple[str, ...]:
    """The optimizer-state keys ``optim`` lets travel in ``direction`` (``upload``/``download``).

    Federated optimizers declare them (``upload_keys``: sent by collaborators
    and installed into the aggregator's optimizer; ``download_keys``: served
    by the aggregator and installed into the collaborators'); any other
    optimizer's state stays where it is.
    """
    return tuple(getattr(optim, f"{direction}_keys", ()))


def optim_as_list(optim_list: Any) -> list[Any]:
    """``None`` -> [], one optimizer -> [it], a list or tuple -> a list of them."""
    if optim_list is None:
        return []
    if isinstance(optim_list, (list, tuple)):
        return list(optim_list)
    return [optim_list]
