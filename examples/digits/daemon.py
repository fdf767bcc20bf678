"""The digits federation as a ``zmqfed-node`` / ``zmqfed-sim`` app.

::

    zmqfed-sim --star 8 --app examples.digits.daemon:factory --rounds 20
    zmqfed-node run --topology examples/topologies/star3.yaml --node client0 \\
        --app examples.digits.daemon:factory --state-dir /var/lib/zmqfed

Options (``--set KEY=VALUE``): ``alpha`` (Dirichlet skew, 0.5), ``epochs``
(local epochs, 3), ``lr`` (local SGD rate, 0.2), ``algo`` (``fedavg``,
``fedprox`` or ``scaffold``), ``mu`` (FedProx, 0.01), ``seed`` (0);
``min_clients`` with ``round_timeout`` (seconds, 5) end a round at its
deadline once that many uploads arrived, so a lost collaborator cannot stall
the federation.

Differential privacy (docs/privacy.md): ``dp`` = ``central`` (the
aggregator clips and noises: ``central_dp``), ``local`` (each collaborator
does: ``local_dp``) or ``dpsgd`` (record-level DP-SGD with Opacus on the
collaborators), with ``noise`` (noise multiplier, 1.0), ``clip`` (update
clip, or DP-SGD's per-example gradient clip, 1.0), ``delta`` (1e-5),
``target_epsilon`` (stop before exceeding it) and ``adaptive`` (1: adaptive
clipping to the median norm). Epsilon joins every round's record.

Homomorphic aggregation (CKKS, docs/privacy.md): ``he`` = ``all`` or
``head`` (the output layer only) with ``he_keys`` = a directory holding
``public.ckks`` (the aggregator's) and ``secret.ckks`` (the collaborators').
The aggregator then adds ciphertexts it cannot read: its own model (and so
its held-out accuracy) stays where it started for the encrypted layers.
"""

from __future__ import annotations

from typing import Any

import torch

from examples.digits.app import (
    BATCH_SIZE,
    LOCAL_EPOCHS,
    LOCAL_LR,
    MU,
    build_model,
    client_part,
    evaluate,
    held_out_split,
    train_epochs,
)
from zmqfed.app import App, NodeContext
from zmqfed.core import Maintainer
from zmqfed.errors import ConfigError
from zmqfed.functional import (
    AdaptiveClipping,
    central_dp,
    ckks_aggregation,
    ckks_package,
    dp_sgd,
    local_dp,
)
from zmqfed.meta import Meta
from zmqfed.optim import FederatedOptimizer, ProxOptimizer, ScaffoldOptimizer
from zmqfed.props import AGGREGATOR, COLLABORATOR

__all__ = ["factory"]

DP_MODES = ("central", "local", "dpsgd")


def _dp_settings(opt: dict[str, str]) -> dict[str, Any]:
    target = opt.get("target_epsilon")
    return {
        "noise_multiplier": float(opt.get("noise", 1.0)),
        "delta": float(opt.get("delta", 1e-5)),
        "target_epsilon": float(target) if target else None,
    }


def factory(ctx: NodeContext) -> App:
    """Build the digits app for the node described by ``ctx``."""
    torch.set_num_threads(1)
    opt = dict(ctx.options)
    seed = int(opt.get("seed", 0))
    model = build_model(seed)
    app = App(model=model, rounds=ctx.rounds or 20)
    if "min_clients" in opt:
        app.min_clients = int(opt["min_clients"])
        app.round_timeout = float(opt.get("round_timeout", "5"))
    algo = opt.get("algo", "fedavg")
    if algo not in ("fedavg", "fedprox", "scaffold"):
        raise ConfigError(f"algo must be fedavg, fedprox or scaffold, got {algo!r}")
    if ctx.aggregator and not ctx.collaborator:
        if algo == "scaffold":  # the server keeps the global control variate c
            server_sgd = torch.optim.SGD(model.parameters(), lr=1.0)
            app.server_optim = ScaffoldOptimizer(server_sgd, role=AGGREGATOR)
        x_test, y_test = held_out_split(seed)

        def evaluate_global() -> dict[str, Any]:
            accuracy, loss = evaluate(model, x_test, y_test)
            return {"test_accuracy": accuracy, "test_loss": loss}

        app.evaluate = evaluate_global
    if ctx.collaborator:
        x, y = client_part(ctx.index, ctx.parts, float(opt.get("alpha", 0.5)), seed)
        lr = float(opt.get("lr", LOCAL_LR))
        epochs = int(opt.get("epochs", LOCAL_EPOCHS))
        sgd = torch.optim.SGD(model.parameters(), lr=lr)
        if algo == "fedprox":
            local: Any = ProxOptimizer(sgd, COLLABORATOR, mu=float(opt.get("mu", MU)))
        elif algo == "scaffold":
            local = ScaffoldOptimizer(sgd, role=COLLABORATOR)
        else:
            local = FederatedOptimizer(sgd, COLLABORATOR)
        generator = torch.Generator().manual_seed(seed + 1000 * (ctx.index + 1))

        def train(meta: Meta) -> dict[str, Any]:
            loss = train_epochs(model, local, x, y, epochs, BATCH_SIZE, generator)
            return {"instances": len(y), "loss": loss}

        app.train = train
        app.local_optim = local
    he = opt.get("he", "")
    if he:
        _add_he(app, ctx, he, opt)
    dp = opt.get("dp", "")
    if dp:
        _add_dp(app, ctx, dp, opt, x if ctx.collaborator else None, y if ctx.collaborator else None)
    return app


def _add_he(app: App, ctx: NodeContext, he: str, opt: dict[str, str]) -> None:
    """CKKS aggregation of ``all`` layers or the output layer (``head``)."""
    if he not in ("all", "head"):
        raise ConfigError(f"he must be all or head, got {he!r}")
    folder = opt.get("he_keys")
    if not folder:
        raise ConfigError("he needs he_keys=DIR with public.ckks and secret.ckks")
    if ctx.aggregator and not ctx.collaborator:
        app.agg_func = ckks_aggregation
        app.agg_kwargs = {"keys": f"{folder}/public.ckks"}
        return
    layers = None if he == "all" else "2.*"
    app.configure = lambda m: ckks_package(f"{folder}/secret.ckks", layers=layers)


def _add_dp(app: App, ctx: NodeContext, dp: str, opt: dict[str, str], x: Any, y: Any) -> None:
    """Register the DP hook ``dp`` on every maintainer of the node (``App.configure``)."""
    if dp not in DP_MODES:
        raise ConfigError(f"dp must be one of {DP_MODES}, got {dp!r}")
    settings = _dp_settings(opt)
    clip = float(opt.get("clip", 1.0))
    adaptive = AdaptiveClipping() if opt.get("adaptive", "0") not in ("", "0") else None
    if dp in ("central", "local"):
        hook = central_dp if dp == "central" else local_dp

        def configure(m: Maintainer) -> None:
            hook(clip=clip, adaptive=adaptive, **settings)

        app.configure = configure
        return
    if not ctx.collaborator:
        app.configure = lambda m: dp_sgd(max_grad_norm=clip, **settings)
        return
    # DP-SGD: Poisson-sampled batches of the collaborator's data, per-example clipping
    from torch.utils.data import DataLoader, TensorDataset

    model, seed = app.model, int(opt.get("seed", 0))
    lr, epochs = float(opt.get("lr", LOCAL_LR)), int(opt.get("epochs", LOCAL_EPOCHS))
    loader = DataLoader(
        TensorDataset(x, y),
        batch_size=BATCH_SIZE,
        generator=torch.Generator().manual_seed(seed + 7 * (ctx.index + 1)),
    )
    private: dict[str, Any] = {}

    def configure_dpsgd(m: Maintainer) -> None:
        sgd = torch.optim.SGD(model.parameters(), lr=lr)
        # noise_multiplier, delta, target_epsilon: the aggregator budgets; collaborators report
        private["dp"] = dp_sgd(model, sgd, loader, max_grad_norm=clip, **settings)

    def train_dpsgd(meta: Meta) -> dict[str, Any]:
        import torch.nn.functional as F

        dp_run = private["dp"]
        total, batches = 0.0, 0
        for _ in range(epochs):
            for xb, yb in dp_run.data_loader:
                dp_run.optimizer.zero_grad()
                if len(yb) == 0:  # Poisson sampling may draw an empty batch
                    continue
                loss = F.cross_entropy(dp_run.module(xb), yb)
                loss.backward()
                dp_run.optimizer.step()
                total += float(loss)
                batches += 1
        return {"instances": len(y), "loss": total / max(batches, 1)}

    app.configure = configure_dpsgd
    app.train = train_dpsgd
    app.local_optim = None  # plain SGD keeps no state to upload
