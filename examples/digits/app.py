"""Federated digits over real sockets: one module for the aggregator and every collaborator.

Each node is its own process::

    python -m examples.digits.app --role aggregator --name aggregator \\
        --endpoint tcp://127.0.0.1:5555 --clients 8 --rounds 20 --algo fedavg
    python -m examples.digits.app --role collaborator --name client0 \\
        --endpoint tcp://127.0.0.1:5555 --clients 8 --rounds 20 --algo fedavg
    ...  # client1 .. client7

The topology is ``zmqfed.topo.star(clients, endpoint)`` (collaborators
``client0`` .. ``client{n-1}``, zero-padded beyond 10). Every node builds the
same MLP from ``--seed``. Collaborator ``k`` trains on part ``k`` of a
``DirichletPartitioner(alpha)`` split of scikit-learn's digits training set
(label skew) and uploads its weights with ``instances`` (its sample count)
and its mean training ``loss``. The aggregator averages the uploads
(``naive_aggregation``: FedAvg, weighted by ``instances``), steps
``FederatedOptimizer(SGD(lr=1.0))`` onto the average, evaluates the global
model on the held-out digits test split after every round and prints one
table line per round and ``FINAL accuracy=...`` at the end.

``--algo`` picks the collaborators' local optimizer:

* ``fedavg``   — plain local SGD;
* ``fedprox``  — ``ProxOptimizer`` (proximal term ``--mu``);
* ``scaffold`` — ``ScaffoldOptimizer`` on both ends; the control variate
  ``'c'`` travels in the optimizer state (``package``/``unpackage``), the
  aggregator averages the uploaded ``Δc_i`` with the weights.

:func:`centralized_baseline` trains the same model on all training data for
the reference accuracy (``--role centralized`` runs it alone).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zmqfed.topo as topo
from zmqfed.api import API, RoundRecord, run_collaborator
from zmqfed.core import Maintainer
from zmqfed.data import DirichletPartitioner, PartitionerDataset, digits_dataset
from zmqfed.functional import count_step
from zmqfed.functional.agg_mean import naive_aggregation
from zmqfed.functional.reduce import meta_reduce
from zmqfed.meta import Meta
from zmqfed.optim import FederatedOptimizer, ProxOptimizer, ScaffoldOptimizer
from zmqfed.props import AGGREGATOR, COLLABORATOR

__all__ = [
    "build_model",
    "centralized_baseline",
    "evaluate",
    "main",
    "run_aggregator",
    "run_collaborator_node",
    "train_epochs",
]

log = logging.getLogger("examples.digits")

ALGOS = ("fedavg", "fedprox", "scaffold")

#: Defaults shared by the federation and the centralized baseline.
HIDDEN = 64
LOCAL_LR = 0.2
LOCAL_EPOCHS = 3
BATCH_SIZE = 8
MU = 0.01


# --------------------------------------------------------------------------- model & data


def build_model(seed: int = 0, hidden: int = HIDDEN) -> nn.Module:
    """The 64-``hidden``-10 MLP, initialised from ``seed`` (identical on every node)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``(x, y)``."""
    was_training = model.training
    model.eval()
    try:
        logits = model(x)
        loss = float(F.cross_entropy(logits, y))
        accuracy = float((logits.argmax(dim=1) == y).float().mean())
    finally:
        model.train(was_training)
    return accuracy, loss


def train_epochs(
    model: nn.Module,
    optim: Any,
    x: Tensor,
    y: Tensor,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """``epochs`` passes of mini-batch training; returns the mean training loss."""
    model.train()
    total = 0.0
    batches = 0
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            optim.zero_grad()
            loss = F.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            optim.step()
            total += loss.item()
            batches += 1
    return total / max(batches, 1)


def held_out_split(seed: int) -> tuple[Tensor, Tensor]:
    """The held-out digits test split (25 %, stratified by ``seed``)."""
    test = digits_dataset(train=False, seed=seed)
    return test.data, test.targets


def client_part(part_id: int, clients: int, alpha: float, seed: int) -> tuple[Tensor, Tensor]:
    """Part ``part_id`` of the Dirichlet(``alpha``) split of the training set."""
    train = digits_dataset(train=True, seed=seed)
    parts = PartitionerDataset(train, clients, DirichletPartitioner(alpha=alpha, seed=seed))
    parts.set_part_id(part_id)
    idx = torch.as_tensor(parts.part_indices(), dtype=torch.int64)
    return train.data[idx], train.targets[idx]


def centralized_baseline(
    epochs: int = 60,
    *,
    lr: float = LOCAL_LR,
    batch_size: int = BATCH_SIZE,
    seed: int = 0,
    hidden: int = HIDDEN,
) -> float:
    """Test accuracy of the same model trained with SGD on all the training data.

    The default ``epochs`` matches what one collaborator does in 20 rounds of
    ``LOCAL_EPOCHS`` (3) local epochs.
    """
    torch.set_num_threads(1)
    train = digits_dataset(train=True, seed=seed)
    x_test, y_test = held_out_split(seed)
    model = build_model(seed, hidden)
    optim = torch.optim.SGD(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    train_epochs(model, optim, train.data, train.targets, epochs, batch_size, generator)
    return evaluate(model, x_test, y_test)[0]


# --------------------------------------------------------------------------- nodes


def _props(args: argparse.Namespace) -> Any:
    topology = topo.star(args.clients, args.endpoint)
    groups = topo.analysis(topology, args.name)
    if len(groups) != 1:
        raise SystemExit(f"{args.name} belongs to {len(groups)} groups; a star has one each")
    return groups[0]


def run_aggregator(args: argparse.Namespace) -> float:
    """Serve ``args.rounds`` rounds; print a line per round and the final accuracy."""
    props = _props(args)
    if not props.aggregator:
        raise SystemExit(f"{args.name} is not the star's aggregator")
    model = build_model(args.seed, args.hidden)
    x_test, y_test = held_out_split(args.seed)
    maintainer = Maintainer(props, model.state_dict(keep_vars=True), timeout=args.timeout)
    with maintainer:
        count_step(args.clients)
    server_sgd = torch.optim.SGD(model.parameters(), lr=args.server_lr)
    if args.algo == "scaffold":
        fed_optim: FederatedOptimizer = ScaffoldOptimizer(server_sgd, role=AGGREGATOR)
    else:
        fed_optim = FederatedOptimizer(server_sgd, role=AGGREGATOR)

    accuracy = 0.0
    print(
        f"digits {args.algo}: {args.clients} clients, Dirichlet({args.alpha}), "
        f"{args.rounds} rounds, seed {args.seed}",
        flush=True,
    )
    print(
        f"{'round':>5} | {'clients':>7} | {'train loss':>10} | {'test loss':>9} | "
        f"{'test acc':>8} | {'seconds':>7}",
        flush=True,
    )

    def on_round(record: RoundRecord) -> None:
        nonlocal accuracy
        accuracy, test_loss = evaluate(model, x_test, y_test)
        train_loss = record.metrics.get("loss", float("nan"))
        print(
            f"{record.round + 1:>5} | {record.participants:>7} | {train_loss:>10.4f} | "
            f"{test_loss:>9.4f} | {accuracy:>8.4f} | {record.seconds:>7.2f}",
            flush=True,
        )

    api = API(
        maintainer,
        fed_optim,
        args.rounds,
        naive_aggregation,
        reduce_func=functools.partial(meta_reduce, keys=["loss"]),
        progress=args.progress,
        record_path=args.records,
        on_round=on_round,
    )
    tic = time.perf_counter()
    try:
        api.run()
    finally:
        maintainer.close()
    print(
        f"FINAL accuracy={accuracy:.4f} algo={args.algo} rounds={args.rounds} "
        f"clients={args.clients} seconds={time.perf_counter() - tic:.1f}",
        flush=True,
    )
    return accuracy


def run_collaborator_node(args: argparse.Namespace) -> int:
    """Train on this node's Dirichlet part for ``args.rounds`` rounds; return the rounds answered."""
    props = _props(args)
    if not props.collaborator:
        raise SystemExit(f"{args.name} is not a collaborator of the star")
    part_id = props.collaborators.index(args.name)
    x, y = client_part(part_id, args.clients, args.alpha, args.seed)
    model = build_model(args.seed, args.hidden)
    sgd = torch.optim.SGD(model.parameters(), lr=args.lr)
    if args.algo == "fedprox":
        fed_optim: FederatedOptimizer = ProxOptimizer(sgd, role=COLLABORATOR, mu=args.mu)
    elif args.algo == "scaffold":
        fed_optim = ScaffoldOptimizer(sgd, role=COLLABORATOR)
    else:
        fed_optim = FederatedOptimizer(sgd, role=COLLABORATOR)
    generator = torch.Generator().manual_seed(args.seed * 1000 + part_id)
    maintainer = Maintainer(props, model.state_dict(keep_vars=True), timeout=args.timeout)

    def train(meta: Meta) -> dict[str, Any]:
        loss = train_epochs(model, fed_optim, x, y, args.epochs, args.batch_size, generator)
        return {"instances": len(y), "loss": loss}

    log.info("%s: part %d, %d samples", args.name, part_id, len(y))
    try:
        return run_collaborator(maintainer, train, fed_optim=fed_optim, rounds=args.rounds)
    finally:
        maintainer.close()


# --------------------------------------------------------------------------- CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m examples.digits.app", description=__doc__.splitlines()[0]
    )
    p.add_argument("--role", choices=(AGGREGATOR, COLLABORATOR, "centralized"), required=True)
    p.add_argument("--name", default=None, help="nick name (aggregator, client0, ...)")
    p.add_argument("--endpoint", default="tcp://127.0.0.1:5555")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--algo", choices=ALGOS, default="fedavg")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--records", default=None, help="aggregator: append RoundRecords as JSON lines")
    p.add_argument("--epochs", type=int, default=LOCAL_EPOCHS, help="local epochs per round")
    p.add_argument("--lr", type=float, default=LOCAL_LR, help="local SGD learning rate")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE)
    p.add_argument("--mu", type=float, default=MU, help="FedProx proximal coefficient")
    p.add_argument("--server-lr", type=float, default=1.0, help="aggregator SGD learning rate")
    p.add_argument("--hidden", type=int, default=HIDDEN)
    p.add_argument("--timeout", type=float, default=120.0, help="seconds any step may take")
    p.add_argument("--progress", action="store_true", help="aggregator: tqdm bar over rounds")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    if args.name is None:
        args.name = "aggregator" if args.role == AGGREGATOR else args.role
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s {args.name} %(name)s %(levelname)s %(message)s",
    )
    torch.set_num_threads(1)
    if args.role == AGGREGATOR:
        run_aggregator(args)
    elif args.role == COLLABORATOR:
        run_collaborator_node(args)
    else:
        accuracy = centralized_baseline(
            args.rounds * args.epochs,
            lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed,
            hidden=args.hidden,
        )
        print(f"FINAL accuracy={accuracy:.4f} algo=centralized epochs={args.rounds * args.epochs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
