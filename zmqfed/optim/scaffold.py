"""``ScaffoldOptimizer``: SCAFFOLD's control variates (Karimireddy et al., ICML 2020).

How the control variates travel (as in OpenFed, through the optimizer state,
so ``package`` / ``unpackage`` carry them; the key is ``'c'``):

* **aggregator** — ``state[p]['c']`` holds the global control variate ``c``;
  ``package(fed_optim)`` sends it down with the model.
* **collaborator** — ``state[p]['c']`` exists from construction (zeros), so
  ``unpackage`` fills it with the downloaded ``c``. Local steps use
  ``y <- y - lr (g - c_i + c)``. :meth:`round` (end of local training)
  computes ``c_i+`` (option II: ``c_i - c + (x - y) / (K lr)``, with ``K lr``
  generalised to the sum of the learning rates used; option I, the gradient
  at ``x``, when :meth:`acg` ran this round), keeps ``c_i <- c_i+`` in the
  wrapper, and leaves ``Δc_i = c_i+ - c_i`` in ``state[p]['c']`` for upload.
  :meth:`clear_state_dict` (after the upload) puts the round's ``c`` back
  unless a download already replaced it.
  The local ``c_i`` is never in ``optim.state``, so it is never uploaded or
  overwritten by a download.
* **aggregator again** — the aggregation rule averages the uploaded ``Δc_i``
  into ``state[p]['c']`` (any rule works; ``average_aggregation`` is the
  paper's unweighted mean). :meth:`step` then sets
  ``c <- c + c_lr * mean(Δc_i)`` and moves the model with the wrapped
  optimizer on the pseudo-gradient (``SGD(lr=η_g)``: ``x <- x + η_g mean(Δy)``).
  The paper's ``c <- c + (1/N) Σ_S Δc_i`` is ``c_lr = |S| / N``: 1.0 (the
  default) with full participation.

A collaborator process keeps one ``c_i``: simulating several clients in one
process (``set_part_id``) shares it between them.

:meth:`ScaffoldOptimizer.state_dict` carries what lives outside the wrapped
optimizer's state too (under the key ``'scaffold'``): the aggregator's
published ``c`` and a collaborator's ``c_i``, so a checkpoint resumes both
(``zmqfed-node`` checkpoints the server optimizer every round).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zmqfed.errors import ConfigError
from zmqfed.optim.fed_optim import FederatedOptimizer, split_batch
from zmqfed.props import COLLABORATOR

log = logging.getLogger(__name__)

__all__ = ["ScaffoldOptimizer"]

C = "c"
#: The key of SCAFFOLD's own state in :meth:`ScaffoldOptimizer.state_dict`.
STATE_KEY = "scaffold"


class ScaffoldOptimizer(FederatedOptimizer):
    """SCAFFOLD for either role (see the module docstring for the state flow).

    Parameters
    ----------
    acg_loss_fn:
        Loss of option I's gradient at ``x`` (:meth:`acg`): a callable
        ``(output, target) -> loss`` or the name of a ``torch.nn.functional``
        loss. Option II needs no extra pass and is used unless :meth:`acg`
        ran in the round.
    c_lr:
        Server step on the control variate, ``|S| / N`` (sampled over total
        collaborators); 1.0 for full participation.
    """

    needs_acg = True
    #: Versions whose starting ``c_i`` is kept for :meth:`rewind_to`: an aggregator
    #: that checkpoints every round rewinds by at most one.
    REWIND_DEPTH = 2
    upload_keys = (C,)  # the clients' control-variate updates
    download_keys = (C,)  # the global control variate

    def __init__(
        self,
        optim: Any,
        role: str = COLLABORATOR,
        max_acg_step: int = -1,
        acg_loader: Iterable[Any] | None = None,
        acg_epoch: int = 1,
        acg_loss_fn: str | Callable[..., Tensor] = "cross_entropy",
        c_lr: float = 1.0,
    ) -> None:
        super().__init__(optim, role, max_acg_step, acg_loader, acg_epoch)
        if isinstance(acg_loss_fn, str):
            fn = getattr(F, acg_loss_fn, None)
            if not callable(fn):
                raise ConfigError(f"acg_loss_fn {acg_loss_fn!r} is not in torch.nn.functional")
        else:
            fn = acg_loss_fn
        if not 0.0 < float(c_lr) <= 1.0:
            raise ConfigError(f"c_lr is |S|/N and must be in (0, 1], got {c_lr!r}")
        self.acg_loss_fn: Callable[..., Tensor] = fn
        self.c_lr = float(c_lr)
        # collaborator: local control variate, and this round's bookkeeping
        self.local_control: dict[Tensor, Tensor] = {}
        self._x0: dict[Tensor, Tensor] = {}
        self._c_round: dict[Tensor, Tensor] = {}
        self._lr_sum: dict[Tensor, float] = {}
        self._acg_grad: dict[Tensor, Tensor] = {}
        self._acg_count = 0
        self._pending_c: dict[Tensor, tuple[Tensor, Tensor, int]] = {}
        #: c_i before training on each of the last REWIND_DEPTH versions (begin_round).
        self._c_i_before: dict[int, dict[Tensor, Tensor]] = {}
        self._forgotten = -1  # the newest version whose snapshot was dropped
        # aggregator: the 'c' tensor last published, to tell a fresh aggregate from it
        self._published: dict[Tensor, Tensor] = {}
        with torch.no_grad():
            for p in self.params():
                if p.requires_grad:
                    c = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self.state[p][C] = c
                    self._published[p] = c

    # -- collaborator -----------------------------------------------------

    def _collaborator_step(self) -> None:
        for p, group in self.params_with_grad():
            if p not in self._x0:
                self._x0[p] = p.detach().clone()
                self._c_round[p] = self._global_c(p).clone()
                self._lr_sum[p] = 0.0
            c_i = self.local_control.get(p)
            assert p.grad is not None
            p.grad.add_(self._c_round[p])
            if c_i is not None:
                p.grad.sub_(c_i)
            self._lr_sum[p] += float(group["lr"])

    def begin_round(self, version: int) -> None:
        """Keep ``c_i`` as it is before local training on the model of ``version``."""
        self._c_i_before[version] = {p: c.clone() for p, c in self.local_control.items()}
        for old in sorted(self._c_i_before)[: -self.REWIND_DEPTH]:
            del self._c_i_before[old]
            self._forgotten = max(self._forgotten, old)

    def rewind_to(self, version: int) -> None:
        """Put ``c_i`` back to what it was before training on ``version``.

        An aggregator restarted from a checkpoint older than the update it
        lost serves ``version`` again; redone from the advanced ``c_i``, the
        round would count this collaborator's control step twice.
        """
        later = sorted(v for v in self._c_i_before if v >= version)
        if later:  # the first round trained at or after it (test rounds take no snapshot)
            self.local_control = self._c_i_before[later[0]]
            for v in later:
                del self._c_i_before[v]
        if version <= self._forgotten:
            log.warning(
                "SCAFFOLD: rewound to version %d, but c_i is kept only from before the last "
                "%d rounds; the rounds on versions %d to %d advance it a second time",
                version,
                self.REWIND_DEPTH,
                version,
                self._forgotten,
            )

    def _global_c(self, p: Tensor) -> Tensor:
        c = self.state[p].get(C)
        return c if c is not None else torch.zeros_like(p)

    def _acg_loss(self, model: nn.Module, batch: Any, device: torch.device) -> Tensor:
        x, y = split_batch(batch, device)
        if y is None:
            raise ConfigError("SCAFFOLD's acg needs (input, target) batches")
        return self.acg_loss_fn(model(x), y)

    def _acg_step(self) -> None:
        # running mean of the full-batch gradient at x (option I)
        self._acg_count += 1
        for p, _ in self.params_with_grad():
            assert p.grad is not None
            g = self._acg_grad.get(p)
            if g is None:
                self._acg_grad[p] = p.grad.detach().clone()
            else:
                g.add_(p.grad.detach() - g, alpha=1.0 / self._acg_count)

    def _collaborator_round(self) -> None:
        for p, x0 in self._x0.items():
            c = self._c_round[p]
            c_i = self.local_control.get(p)
            if c_i is None:
                c_i = torch.zeros_like(p)
            if p in self._acg_grad:
                c_new = self._acg_grad[p].to(p.dtype)  # option I: gradient at x
            else:  # option II
                lr_sum = self._lr_sum[p]
                if lr_sum <= 0.0:
                    raise ConfigError("SCAFFOLD option II needs a positive learning rate")
                c_new = c_i - c + (x0 - p.detach()) / lr_sum
            delta = c_new - c_i  # Δc_i, uploaded by package()
            self.state[p][C] = delta
            self._pending_c[p] = (c, delta, delta._version)
            self.local_control[p] = c_new
        self._x0.clear()
        self._c_round.clear()
        self._lr_sum.clear()
        self._acg_grad.clear()
        self._acg_count = 0

    def clear_state_dict(self, keys: Iterable[str] | None = None) -> None:
        """After the upload: put the round's global ``c`` back in place of ``Δc_i``."""
        if self.collaborator:
            for p, (c, delta, version) in self._pending_c.items():
                # restore only if no download replaced or overwrote Δc_i meanwhile
                if self.state[p].get(C) is delta and delta._version == version:
                    self.state[p][C] = c
            self._pending_c.clear()
            self._acg_grad.clear()
            self._acg_count = 0
        super().clear_state_dict(keys)

    # -- checkpoints --------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimizer's state, plus SCAFFOLD's control variates.

        ``state_dict()['scaffold']`` holds ``global_control`` (the ``c`` the
        aggregator published) and ``local_control`` (a collaborator's
        ``c_i``), each by the parameter's index, as torch numbers them.
        Neither is in ``optim.state`` between rounds in a form that restores
        them: without them a resumed aggregator restarted ``c`` from zero.
        """
        out = dict(super().state_dict())
        index = {p: i for i, p in enumerate(self.params())}

        def by_index(tensors: dict[Tensor, Tensor]) -> dict[int, Tensor]:
            return {index[p]: t.detach().clone() for p, t in tensors.items() if p in index}

        out[STATE_KEY] = {
            "global_control": by_index(self._published),
            "local_control": by_index(self.local_control),
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load what :meth:`state_dict` returned (an inner optimizer's state dict works too)."""
        state_dict = dict(state_dict)
        own = state_dict.pop(STATE_KEY, None) or {}
        super().load_state_dict(state_dict)
        params = list(self.params())

        def by_param(tensors: dict[Any, Tensor]) -> dict[Tensor, Tensor]:
            out = {}
            for i, t in tensors.items():
                if not 0 <= int(i) < len(params):
                    raise ConfigError(f"SCAFFOLD state names parameter {i}, of {len(params)}")
                p = params[int(i)]
                if tuple(t.shape) != tuple(p.shape):
                    raise ConfigError(
                        f"SCAFFOLD state of parameter {i} has shape {list(t.shape)}, "
                        f"expected {list(p.shape)}"
                    )
                out[p] = t.detach().to(device=p.device, dtype=p.dtype).clone()
            return out

        self._c_i_before.clear()  # snapshots of the c_i replaced here mean nothing now
        self._forgotten = -1
        self.local_control = by_param(own.get("local_control", {}))
        published = by_param(own.get("global_control", {}))
        if not published and self.aggregator:
            # an older checkpoint: the optimizer state's 'c' is what was published
            published = {p: self.state[p][C] for p in params if C in self.state.get(p, {})}
        self._published.update(published)
        if self.aggregator:
            for p, c in published.items():
                # one object again: a step that gets no new Δc must not count c as one
                self.state[p][C] = c

    # -- aggregator -------------------------------------------------------

    def _aggregator_step(self) -> None:
        for p, _ in self.params_with_grad():
            delta = self.state[p].get(C)
            published = self._published.get(p)
            # only an aggregation rule replaces the tensor: the same object means
            # no Δc arrived this round (e.g. collaborators without SCAFFOLD)
            if delta is None or delta is published:
                continue
            base = published if published is not None else torch.zeros_like(p)
            new_c = base + delta.to(base.dtype) * self.c_lr
            self.state[p][C] = new_c
            self._published[p] = new_c

    @property
    def global_control(self) -> dict[Tensor, Tensor]:
        """Aggregator: the current global control variate per parameter."""
        return dict(self._published)
