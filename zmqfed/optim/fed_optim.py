"""``FederatedOptimizer``: a role-aware wrapper around any torch optimizer.

The same class runs on both ends of a federated group:

* a **collaborator** trains locally with it; subclasses correct the gradient
  before the wrapped optimizer steps (FedProx's proximal term, SCAFFOLD's
  control variates) and update their own state at the end of local training
  (:meth:`round`);
* the **aggregator** steps it on the pseudo-gradient ``p - aggregate`` that an
  aggregation rule installed in ``p.grad``. ``FederatedOptimizer(SGD(lr=1.0))``
  therefore just moves the model onto the aggregate (FedAvg). Server-side
  adaptive optimization (Reddi et al., 2021) is the same call with another
  optimizer: ``Adam`` gives FedAdam, ``Adagrad`` FedAdagrad,
  ``SGD(momentum=...)`` FedAvgM, :class:`~zmqfed.optim.FedYogi` FedYogi.
  (torch's Adam applies bias correction, which the paper's FedAdam omits; the
  difference fades after a few rounds.)

What travels of ``optim.state[p]`` is declared per class: ``upload_keys``
go up with an upload (and the aggregation installs their average into the
aggregator's optimizer), ``download_keys`` come down with the model.  The
base class declares none, so a wrapped optimizer's own state (momentum,
Adam's moments, a server's FedAvgM/FedYogi state) never leaves its node and
is never overwritten by another node's (docs/reliability.md, "Optimizer
state").

Typical rounds::

    # collaborator
    maintainer.step(upload=False)  # download; unpackage
    fed_optim.acg(network)  # only optimizers that need it
    for x, y in loader:
        fed_optim.zero_grad()
        loss_fn(network(x), y).backward()
        fed_optim.step()
    fed_optim.round()
    maintainer.package(fed_optim)
    maintainer.step(download=False)
    fed_optim.clear_state_dict()

    # aggregator
    maintainer.package(fed_optim)
    maintainer.step()
    fed_optim.zero_grad()
    naive_aggregation(maintainer.data_list, maintainer.meta_list, optim_list=fed_optim)
    fed_optim.step()
    fed_optim.round()
    fed_optim.clear_state_dict()
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from zmqfed.errors import ConfigError
from zmqfed.props import AGGREGATOR, COLLABORATOR

__all__ = ["FederatedOptimizer"]


class FederatedOptimizer:
    """Wrap ``optim`` for the federated role ``role``.

    Parameters
    ----------
    optim:
        Any ``torch.optim.Optimizer`` (or object with ``param_groups``,
        ``state``, ``step`` and ``zero_grad``). Attach LR schedulers to it, not
        to the wrapper.
    role:
        ``zmqfed.props.AGGREGATOR`` or ``COLLABORATOR``.
    max_acg_step:
        Batches per epoch :meth:`acg` processes; ``-1`` for the whole loader.
    acg_loader:
        Default data loader of :meth:`acg` (batches of ``(input, target)``).
    acg_epoch:
        Passes over the loader :meth:`acg` makes.

    Notes
    -----
    :meth:`step` evaluates ``closure`` once, corrects the gradients, then
    steps the wrapped optimizer *without* the closure: optimizers that
    re-evaluate the closure (LBFGS) would lose the corrections.
    """

    #: Subclasses whose :meth:`round` or aggregation need :meth:`acg` set this.
    needs_acg: bool = False
    #: State keys a collaborator uploads with its model, and the aggregation
    #: installs into the aggregator's optimizer (the optimizer-state contract:
    #: keys not named here never leave their node).
    upload_keys: tuple[str, ...] = ()
    #: State keys the aggregator serves with the model, and collaborators install.
    download_keys: tuple[str, ...] = ()

    def __init__(
        self,
        optim: Any,
        role: str = COLLABORATOR,
        max_acg_step: int = -1,
        acg_loader: Iterable[Any] | None = None,
        acg_epoch: int = 1,
    ) -> None:
        if role not in (AGGREGATOR, COLLABORATOR):
            raise ConfigError(f"role must be {AGGREGATOR!r} or {COLLABORATOR!r}, got {role!r}")
        for attr in ("param_groups", "state", "step", "zero_grad"):
            if not hasattr(optim, attr):
                raise ConfigError(f"{type(optim).__name__} is not an optimizer: it has no {attr!r}")
        if int(acg_epoch) < 1:
            raise ConfigError(f"acg_epoch must be >= 1, got {acg_epoch!r}")
        self.optim = optim
        self.role = role
        self.max_acg_step = int(max_acg_step)
        self.acg_loader = acg_loader
        self.acg_epoch = int(acg_epoch)
        # parameters the wrapped optimizer has initialised its own state for
        self._initialised: set[Tensor] = {p for p in self.params() if self.state.get(p)}

    # -- pass-throughs ----------------------------------------------------

    @property
    def optimizer(self) -> Any:
        """The wrapped optimizer (OpenFed's name for :attr:`optim`)."""
        return self.optim

    @property
    def aggregator(self) -> bool:
        """True on the aggregator."""
        return self.role == AGGREGATOR

    @property
    def collaborator(self) -> bool:
        """True on a collaborator."""
        return self.role == COLLABORATOR

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optim.param_groups

    @property
    def state(self) -> Any:
        """The wrapped optimizer's per-parameter state (what ``package`` sends)."""
        return self.optim.state

    @property
    def defaults(self) -> dict[str, Any]:
        return getattr(self.optim, "defaults", {})

    def state_dict(self) -> dict[str, Any]:
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)
        self._initialised.update(p for p in self.params() if self.state.get(p))

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optim.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optim.add_param_group(param_group)

    def params(self) -> Iterator[Tensor]:
        """Every parameter the wrapped optimizer manages."""
        for group in self.param_groups:
            yield from group["params"]

    def params_with_grad(self) -> Iterator[tuple[Tensor, dict[str, Any]]]:
        """``(p, group)`` for every parameter that has a gradient now."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    yield p, group

    # -- the federated protocol ------------------------------------------

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Correct the gradients for this role, then step the wrapped optimizer.

        Returns the closure's loss (``None`` without a closure).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            if self.collaborator:
                self._collaborator_step()
            else:
                self._aggregator_step()
        self._inner_step()
        return loss

    def _inner_step(self) -> None:
        """Step the wrapped optimizer, shielding its lazy state initialisation.

        torch's Adam, RMSprop, ... initialise a parameter's state only while it
        is empty. Federated keys put there before its first step (a SCAFFOLD
        ``'c'``, an ``'importance'``, state loaded by an aggregation rule) would
        make them fail, so for that first step they are set aside and put back
        afterwards; where the optimizer created the same key, its value wins.
        """
        set_aside: dict[Tensor, dict[str, Any]] = {}
        for p in self.params():
            if p.grad is not None and p not in self._initialised:
                state = self.state.get(p)
                if state:
                    set_aside[p] = dict(state)
                    state.clear()
        try:
            self.optim.step()
        finally:
            for p, kept in set_aside.items():
                state = self.state[p]
                for k, v in kept.items():
                    state.setdefault(k, v)
            self._initialised.update(p for p in self.params() if p.grad is not None)

    def _collaborator_step(self) -> None:
        """Hook: adjust ``p.grad`` before a local step. No-op by default."""

    def _aggregator_step(self) -> None:
        """Hook: adjust ``p.grad`` / state before the server step. No-op by default."""

    def round(self) -> None:
        """End of a round: collaborators call it after local training, the aggregator after its step."""
        with torch.no_grad():
            if self.collaborator:
                self._collaborator_round()
            else:
                self._aggregator_round()

    def begin_round(self, version: int) -> None:
        """Collaborator: local training on the model of ``version`` starts. No-op by default.

        :func:`zmqfed.api.run_collaborator` calls it, and :meth:`rewind_to`
        when the aggregator restarted behind it; an optimizer whose local
        state outlives a round (SCAFFOLD's ``c_i``) keeps what it needs to
        redo a round.
        """

    def rewind_to(self, version: int) -> None:
        """Collaborator: the round on ``version`` is redone; undo what training on it advanced.

        No-op by default.
        """

    def _collaborator_round(self) -> None:
        """Hook: update state at the end of local training. No-op by default."""

    def _aggregator_round(self) -> None:
        """Hook: update state at the end of an aggregation round. No-op by default."""

    def acg(
        self,
        model: nn.Module,
        dataloader: Iterable[Any] | None = None,
    ) -> int:
        """Accumulate gradient information over a loader (OpenFed's "acg").

        Runs ``acg_epoch`` passes of at most ``max_acg_step`` batches over
        ``dataloader`` (default: ``acg_loader``), calling :meth:`_acg_loss`
        then :meth:`_acg_step` per batch, and clears the gradients afterwards.
        A no-op returning 0 for optimizers that do not use it
        (``needs_acg`` False). Call it at the start of a round, before local
        training. The model is put in train mode (as in OpenFed, so BatchNorm
        running statistics move) and its previous mode restored.

        Returns
        -------
        int
            Number of batches processed.
        """
        if not self.needs_acg:
            return 0
        loader = dataloader if dataloader is not None else self.acg_loader
        if loader is None:
            raise ConfigError(
                f"{type(self).__name__}.acg needs a dataloader (argument or acg_loader=)"
            )
        device = next(model.parameters()).device
        was_training = model.training
        model.train()
        batches = 0
        try:
            for _ in range(self.acg_epoch):
                for i, batch in enumerate(loader):
                    if 0 < self.max_acg_step <= i:
                        break
                    model.zero_grad(set_to_none=True)
                    with torch.enable_grad():
                        loss = self._acg_loss(model, batch, device)
                        loss.backward()
                    with torch.no_grad():
                        self._acg_step()
                    batches += 1
        finally:
            model.zero_grad(set_to_none=True)
            model.train(was_training)
        return batches

    def _acg_loss(self, model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        """The loss whose gradients :meth:`_acg_step` accumulates."""
        raise NotImplementedError(f"{type(self).__name__} does not define an acg loss")

    def _acg_step(self) -> None:
        """Fold the current ``p.grad`` into the accumulated state."""

    def clear_state_dict(self, keys: Iterable[str] | None = None) -> None:
        """Drop round-only state (``keys`` from every parameter's state).

        Call after uploading. Subclasses drop their own keys when called
        without arguments.
        """
        if not keys:
            return
        names = list(keys)
        for p in self.params():
            if p in self.state:
                state = self.state[p]
                for k in names:
                    state.pop(k, None)

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.optim).splitlines())
        return f"{type(self).__name__}(role={self.role!r},\n{inner}\n)"


def split_batch(batch: Any, device: torch.device) -> tuple[Tensor, Any]:
    """``(input, target)`` from a batch, moved to ``device`` (target may be None)."""
    if isinstance(batch, (list, tuple)):
        if not batch:
            raise ConfigError("acg got an empty batch")
        x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    else:
        x, y = batch, None
    x = x.to(device)
    if isinstance(y, Tensor):
        y = y.to(device)
    return x, y
