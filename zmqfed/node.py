"""Run one node of a topology with a user's :class:`~zmqfed.app.App`, round after round.

This is what ``zmqfed-node run`` and ``zmqfed-sim`` execute in each process.
An aggregator checkpoints the global state (model, server optimizer, version,
round records) atomically after every round and resumes from it after a
restart; collaborators reconnect on their own and rejoin at the current
version. A node that aggregates one group and collaborates in another (an edge
of a hierarchy) relays: download from above, serve and aggregate below, upload
the aggregate above.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from zmqfed.api import (
    API,
    RoundRecord,
    aggregate_and_step,
    prepare_for_rule,
    run_collaborator,
    stale_check,
)
from zmqfed.app import App, NodeContext
from zmqfed.checkpoint import load_checkpoint, save_checkpoint
from zmqfed.core import Maintainer, step_points
from zmqfed.errors import ConfigError
from zmqfed.federated import Curve, SocketOptions
from zmqfed.functional import (
    client_sampling,
    count_step,
    deadline_step,
    meta_reduce,
    naive_aggregation,
)
from zmqfed.isolation import reduce_isolated
from zmqfed.meta import Meta
from zmqfed.names import name_path
from zmqfed.ops import NodeOps, OpsOptions
from zmqfed.optim import FederatedOptimizer
from zmqfed.partial import trainable_state_dict
from zmqfed.props import AGGREGATOR, FederatedProperties
from zmqfed.topo import Topology, analysis

__all__ = ["NodeRunner", "trim_records"]

log = logging.getLogger(__name__)

#: Round records kept in memory and in checkpoints, so a daemon's memory stays
#: flat over thousands of rounds; ``NAME.rounds.jsonl`` keeps every round.
KEEP_RECORDS = 100


class NodeRunner:
    """One node's life: build its maintainers, run its rounds, checkpoint, report status.

    Parameters
    ----------
    topology:
        The federation's topology.
    name:
        This node's nick name in it.
    factory:
        ``factory(NodeContext) -> App``.
    state_dir:
        Where checkpoints and ``status.json`` go (``None``: no persistence).
    rounds:
        Overrides ``App.rounds``.
    progress:
        tqdm bar on the aggregator.
    ops:
        Metrics, dashboard and status heartbeat (:class:`~zmqfed.ops.OpsOptions`).
    """

    def __init__(
        self,
        topology: Topology,
        name: str,
        factory: Any,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        rounds: int | None = None,
        options: dict[str, str] | None = None,
        progress: bool = True,
        socket_options: SocketOptions | None = None,
        keys_dir: str | os.PathLike[str] | None = None,
        ops: OpsOptions | None = None,
    ) -> None:
        self.name = name
        if state_dir is not None:
            name_path(state_dir, name)  # every file of this node is named after it
        topology.validate(acyclic=True)  # groups are stepped bottom-up: a cycle never ends
        self.props = tuple(analysis(topology, name))
        self.ctx = NodeContext(name=name, props=self.props, rounds=rounds, options=options or {})
        self.app: App = factory(self.ctx)
        if not isinstance(self.app, App):
            raise ConfigError(
                f"the app factory returned {type(self.app).__name__}, not zmqfed.app.App"
            )
        self.rounds = rounds or self.app.rounds
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.progress = progress
        self.socket_options = socket_options
        self.curve = Curve(Path(keys_dir)) if keys_dir is not None else None
        self.maintainers: list[Maintainer] = []
        #: Recent round records (all of them are in NAME.rounds.jsonl).
        self.records: deque[dict[str, Any]] = deque(maxlen=KEEP_RECORDS)
        self.round = 0
        self.finished = False
        #: What stopped the node, when an error did.
        self.failure: str | None = None
        self.ops = NodeOps(self, topology, ops or OpsOptions())

    # -- persistence ---------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.state_dir is None else name_path(self.state_dir, self.name, ".ckpt")

    def write_status(self, state: str) -> None:
        """Publish the node's state and write ``NAME.status.json`` (``zmqfed-node status``)."""
        self.ops.publish(state)

    # -- running -------------------------------------------------------------
    def run(self) -> None:
        """Run every round of this node (blocks)."""
        agg = [p for p in self.props if p.aggregator]
        col = [p for p in self.props if p.collaborator]
        try:
            self.ops.start()
            self.write_status("starting")
            if agg and col:
                self._run_edge(agg[0], col[0])
            elif agg:
                self._run_aggregator(agg[0])
            else:
                self._run_collaborator(col[0])
            self.finished = True
        except Exception as exc:
            self.failure = f"{type(exc).__name__}: {exc}"
            self.ops.failure = self.failure
            raise
        finally:
            self.close()

    def close(self) -> None:
        """Close every maintainer; a finished aggregator tells its peers it is over."""
        for m in self.maintainers:
            m.close(final=self.finished)
        self.ops.stop()
        state = "finished" if self.finished else "failed" if self.failure else "stopped"
        self.write_status(state)

    def _maintainer(self, props: FederatedProperties) -> Maintainer:
        codec = str(props.settings.get("codec") or self.ctx.options.get("codec") or "raw")
        partial = self.app.partial and props.collaborator
        m = Maintainer(
            props,
            trainable_state_dict(self.app.model)
            if partial
            else self.app.model.state_dict(keep_vars=True),
            socket_options=self.socket_options,
            codec=codec,
            curve=self.curve,
            partial=partial,
        )
        self.maintainers.append(m)
        self.ops.watch(m)
        if self.app.configure is not None:
            with m:
                self.app.configure(m)
        return m

    def _sampling(self) -> dict[str, Any] | None:
        """Client-sampling arguments from the app, overridden by ``--set`` options."""
        opt, app = self.ctx.options, self.app
        try:
            sample = int(opt["sample"]) if "sample" in opt else app.sample
            fraction = float(opt["fraction"]) if "fraction" in opt else app.fraction
            seed = int(opt.get("sample_seed", app.sample_seed))
            over = float(opt.get("over_select", app.over_select))
            min_online = int(opt["min_online"]) if "min_online" in opt else None
        except ValueError as exc:
            raise ConfigError(f"bad sampling option: {exc}") from exc
        if sample is None and fraction is None:
            return None
        return {
            "sample": sample,
            "fraction": None if sample is not None else fraction,
            "seed": seed,
            "over_select": over,
            "deadline": app.round_timeout,
            "min_count": app.min_clients if app.min_clients is not None else 1,
            "min_online": min_online,
        }

    def _step_policy(self, m: Maintainer, props: FederatedProperties) -> None:
        n = len(props.collaborators)
        sampling = self._sampling()
        with m:
            if sampling is not None:
                client_sampling(**sampling)
            elif self.app.min_clients is not None and self.app.round_timeout is not None:
                deadline_step(n, self.app.round_timeout, self.app.min_clients)
            else:
                count_step(n)

    def _server_optim(self) -> Any:
        if self.app.server_optim is not None:
            return self.app.server_optim
        sgd = torch.optim.SGD(self.app.model.parameters(), lr=1.0)
        return FederatedOptimizer(sgd, AGGREGATOR)

    def _run_aggregator(self, props: FederatedProperties) -> None:
        m = self._maintainer(props)
        self._step_policy(m, props)
        server = self._server_optim()
        start = self._resume(m, server)
        if start >= self.rounds:
            log.info("%s: checkpoint says all %d rounds are done", self.name, self.rounds)
            return

        def on_round(record: RoundRecord) -> None:
            self.round = record.round + 1
            self.records.append(asdict(record))
            self._checkpoint(m, server)
            self.ops.round_done(asdict(record))
            log.info(
                "%s round %d: %d participants, %.0f kB in, %.2f s, %s",
                self.name,
                record.round,
                record.participants,
                record.bytes_in / 1e3,
                record.seconds,
                {k: round(v, 4) if isinstance(v, float) else v for k, v in record.metrics.items()},
            )

        api = API(
            m,
            server,
            self.rounds,
            self.app.agg_func or naive_aggregation,
            self.app.agg_kwargs,
            reduce_func=partial(meta_reduce, keys=self.app.reduce_keys),
            progress=self.progress,
            on_round=on_round,
            evaluate=self.app.evaluate,
            start_round=start,
            keep_records=KEEP_RECORDS,
            record_path=None if self.state_dir is None else self.records_path,
        )
        self.write_status("running")
        api.run()

    @property
    def records_path(self) -> Path | None:
        """``NAME.rounds.jsonl``: one line per completed round."""
        return (
            None
            if self.state_dir is None
            else name_path(self.state_dir, self.name, ".rounds.jsonl")
        )

    def _resume(self, m: Maintainer, server: Any) -> int:
        path = self.checkpoint_path
        state = load_checkpoint(path) if path is not None else None
        if self.records_path is not None:
            # A crash after a round's record was appended but before its
            # checkpoint was written redoes that round: drop its first record.
            trim_records(self.records_path, int(state["round"]) if state else 0)
        if state is None:
            return 0
        self.app.model.load_state_dict(state["model"])
        if "server_optim" in state and hasattr(server, "load_state_dict"):
            server.load_state_dict(state["server_optim"])
        m.update_version(int(state["version"]))
        self.round = int(state["round"])
        self.records.extend(state.get("records", []))
        self.ops.restore(list(self.records))
        log.info(
            "%s: resumed from %s at round %d, version %d", self.name, path, self.round, m.version
        )
        return self.round

    def _checkpoint(self, m: Maintainer, server: Any) -> None:
        path = self.checkpoint_path
        if path is None:
            return
        state = {
            "model": self.app.model.state_dict(),
            "version": m.version,
            "round": self.round,
            "records": list(self.records),
        }
        if hasattr(server, "state_dict"):
            state["server_optim"] = server.state_dict()
        save_checkpoint(path, state)

    def _run_collaborator(self, props: FederatedProperties) -> None:
        if self.app.train is None:
            raise ConfigError(f"node {self.name!r} collaborates but the app has no train()")
        m = self._maintainer(props)
        self.write_status("running")
        self.round = run_collaborator(
            m,
            self.ops.timed_train(m, self.app.train),
            fed_optim=self.app.local_optim,
            test=self.app.test,
            rounds=self.rounds,
        )

    def _run_edge(self, below: FederatedProperties, above: FederatedProperties) -> None:
        """Relay: the model comes from above, the leaves train it, their aggregate goes up.

        Toward the aggregator above, the edge is an ordinary collaborator
        (:func:`~zmqfed.api.run_collaborator`) whose "local training" is one
        step of its own group: serve the model below, collect the leaves'
        uploads, aggregate them into the shared model.
        """
        up = self._maintainer(above)
        down = self._maintainer(below)
        self._step_policy(down, below)
        down.on(step_points.upload_received, stale_check, nice=40)
        prepare_for_rule(down, self.app.agg_func or naive_aggregation, self.app.agg_kwargs)
        server = self._server_optim()
        self.write_status("running")

        def relay(meta: Meta) -> dict[str, Any]:
            for key in ("round", "rounds", "mode", "test_rounds"):
                if key in meta:
                    down.meta[key] = meta[key]
            training = meta.get("mode", "train") != "test"
            tic, traffic = time.perf_counter(), (down.stats["bytes_in"], down.stats["bytes_out"])
            # the server optimizers' upload keys are what the leaves may send up
            down.package([server])
            down.step()
            aggregated = time.perf_counter()
            if training and down.data_list:  # first: it drops updates it cannot aggregate
                agg = self.app.agg_func or naive_aggregation
                aggregate_and_step(down, [server], agg, **self.app.agg_kwargs)
            aggregated = time.perf_counter() - aggregated
            # validated on receipt: a finite number >= 0 where present
            instances = sum(float(m.get("instances", 1)) for m in down.meta_list)
            metrics = (
                reduce_isolated(down, meta_reduce, keys=self.app.reduce_keys)
                if down.meta_list
                else {}
            )
            record = {
                "round": int(meta.get("round", self.round) or 0),
                "mode": str(meta.get("mode", "train")),
                "version": down.version,
                "participants": len(down.meta_list),
                "bytes_in": down.stats["bytes_in"] - traffic[0],
                "bytes_out": down.stats["bytes_out"] - traffic[1],
                "seconds": time.perf_counter() - tic,
                "metrics": dict(metrics),
                "aggregate_seconds": aggregated,
            }
            down.clear()
            down.update_version()
            if training:
                self.round += 1
            self.ops.round_done(record)
            return {**metrics, "instances": instances}

        run_collaborator(up, relay, test=relay)


def trim_records(path: Path, before_round: int) -> int:
    """Keep only the records of rounds before ``before_round`` in a rounds.jsonl file.

    Returns how many lines were dropped. A torn last line (a crash mid-write)
    is dropped too.
    """
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = int(record["round"]) < before_round
        except (ValueError, KeyError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
        log.info("%s: dropped %d records of rounds that will run again", path, dropped)
    return dropped
