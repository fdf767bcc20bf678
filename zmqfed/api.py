"""``API``: the aggregator's round runner, and ``run_collaborator`` for the other side.

A round on the aggregator: package the model (with the server optimizer's
state), ``step()`` until the step policy ends the round, aggregate
``data_list``/``meta_list`` into the server optimizer's pseudo-gradient,
``fed_optim.step()``, reduce the collaborators' metrics, record, clear and
move to the next version. With ``with_test_round`` every training round is
followed by an evaluation round in which collaborators only report metrics.

Versions count steps: the aggregator serves version ``v`` during a step and
moves to ``v + 1`` after it; a collaborator asks for the version after the
one it last saw, so it never gets the same step twice, and answers with its
upload tagged ``v + 1``. Uploads tagged with an older version are stale and
refused (``stale_check``), never averaged in as fresh.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from zmqfed.core import Maintainer, StepContext, step_points
from zmqfed.core.contracts import as_context
from zmqfed.errors import AggregatorRewound, ConfigError, PeerOffline, RemoteError
from zmqfed.federated.protocol import CONTRIBUTED, ErrorCode, meta_version
from zmqfed.functional.agg_common import optim_as_list
from zmqfed.functional.agg_mean import naive_aggregation
from zmqfed.functional.agg_rule import AggregationRule
from zmqfed.functional.running_mean import RunningFedAvg
from zmqfed.isolation import aggregate_isolated, reduce_isolated, update_is_finite
from zmqfed.meta import Meta

__all__ = [
    "API",
    "RoundRecord",
    "aggregate_and_step",
    "is_last_round",
    "prepare_for_rule",
    "run_collaborator",
    "stale_check",
]

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What one aggregator step did.

    ``participants`` counts the uploads aggregated.  With a sampling policy
    (``client_sampling``), ``cohort`` names the collaborators it invited and
    ``counted`` those whose upload was counted; both are empty otherwise.
    """

    round: int
    mode: str
    version: int
    participants: int
    bytes_in: int
    bytes_out: int
    seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)
    #: Of ``seconds``, the time spent aggregating and stepping the server optimizers.
    aggregate_seconds: float = 0.0
    cohort: list[str] = field(default_factory=list)
    counted: list[str] = field(default_factory=list)


def stale_check(ctx: StepContext | Maintainer) -> bool | None:
    """``upload_received`` hook: refuse uploads that do not answer the version being served.

    A collaborator answers version ``v`` with an upload tagged ``v + 1``:
    anything older answers an older model (stale), anything newer was trained
    on a model this aggregator has not served (it restarted behind). Registers
    with ``Maintainer.on`` or, OpenFed-style, ``register_step_hook``.
    """
    ctx = as_context(ctx)
    m, pipe = ctx.maintainer, ctx.pipe
    if pipe is None:
        return None
    version = meta_version(pipe.meta)
    if version == m.version + 1:
        return None
    why = "answers an older model" if version <= m.version else "is ahead of this aggregator"
    m.discard(
        f"{'stale' if version <= m.version else 'future'} upload: version {version} {why}; "
        f"the aggregator serves version {m.version}"
    )
    return False


class API(threading.Thread):
    """Run ``rounds`` federated rounds on an aggregator (OpenFed's ``API``).

    ``run()`` runs them in the calling thread, ``start()`` in a new thread
    that is not a daemon: the process lives until the rounds are done.

    Parameters
    ----------
    maintainer:
        The aggregator's Maintainer, with a step policy registered.
    fed_optim:
        Server optimizer(s), e.g. ``FederatedOptimizer(SGD(lr=1.0), role)``:
        one, or a list or tuple of them.
    rounds:
        Training rounds to run.
    agg_func:
        The aggregation rule (an
        :class:`~zmqfed.functional.agg_rule.AggregationRule`, or an
        OpenFed-style ``agg(data_list, meta_list, optim_list)``), called through
        :func:`~zmqfed.functional.agg_rule.call_rule` with the server
        optimizers and ``agg_func_kwargs``: ``elastic_aggregation`` with
        ``dict(quantile=0.3)`` gets both where they belong.
    agg_func_kwargs:
        The rule's own keyword arguments.
    reduce_func:
        ``reduce_func(meta_list, **reduce_func_kwargs) -> dict`` of metrics.
    with_test_round:
        After each training round, run a round in ``mode='test'``.
    progress:
        Show a tqdm bar over rounds.
    record_path:
        Append each :class:`RoundRecord` as a JSON line to this file.
    step_timeout:
        Bound in seconds on each step (``PeerTimeout`` when exceeded).
    on_round:
        Called with each :class:`RoundRecord` (e.g. to evaluate the model).
    evaluate:
        Called after each training round's aggregation; its metrics join the record.
    start_round:
        First round to run (resuming from a checkpoint).
    keep_records:
        Keep only this many recent records in memory (``None``: all); a
        long-running daemon bounds memory this way and relies on ``record_path``.
    fold_uploads:
        Fold each upload into one running instance-weighted mean as it
        arrives (:class:`~zmqfed.functional.RunningFedAvg`) instead of
        keeping every upload until the round ends: the aggregator then holds
        one model of sums, not N uploads.  Computes FedAvg, so ``agg_func``
        must be ``naive_aggregation``; an upload that is not finite is dropped
        (and not counted) when it arrives.
    """

    def __init__(
        self,
        maintainer: Maintainer,
        fed_optim: Any,
        rounds: int,
        agg_func: AggregationRule | Callable[..., Any],
        agg_func_kwargs: dict[str, Any] | None = None,
        reduce_func: Callable[..., Any] | None = None,
        reduce_func_kwargs: dict[str, Any] | None = None,
        with_test_round: bool = False,
        *,
        progress: bool = True,
        record_path: str | os.PathLike[str] | None = None,
        step_timeout: float | None = None,
        on_round: Callable[[RoundRecord], None] | None = None,
        evaluate: Callable[[], Mapping[str, Any]] | None = None,
        start_round: int = 0,
        keep_records: int | None = None,
        fold_uploads: bool = False,
    ) -> None:
        # Not a daemon, as in OpenFed: a process that calls start() and returns
        # stays alive until the rounds are done (OpenFed's Paillier example does).
        super().__init__(name=f"zmqfed-api-{maintainer.nick_name}", daemon=False)
        if not maintainer.aggregator:
            raise ConfigError("API runs on the aggregator; collaborators use run_collaborator()")
        if rounds <= 0:
            raise ConfigError(f"rounds must be positive, got {rounds!r}")
        self.maintainer = maintainer
        self.fed_optim = fed_optim
        self.optim_list = optim_as_list(fed_optim)
        if not self.optim_list:
            raise ConfigError(
                "API needs a server optimizer (fed_optim), e.g. "
                "FederatedOptimizer(torch.optim.SGD(params, lr=1.0), 'aggregator')"
            )
        self.rounds = rounds
        self.agg_func = agg_func
        self.agg_func_kwargs = agg_func_kwargs or {}
        self.reduce_func = reduce_func
        self.reduce_func_kwargs = reduce_func_kwargs or {}
        self.with_test_round = with_test_round
        self.progress = progress
        self.record_path = record_path
        self.step_timeout = step_timeout
        self.on_round = on_round
        self.evaluate = evaluate
        if not 0 <= start_round <= rounds:
            raise ConfigError(f"start_round must be in [0, {rounds}], got {start_round!r}")
        self.start_round = start_round
        #: The latest rounds (``keep_records`` of them; ``record_path`` has them all).
        self.records: deque[RoundRecord] = deque(maxlen=keep_records)
        self.error: BaseException | None = None
        #: Why the rounds ended before ``rounds`` (a hook's ``end_training``), or None.
        self.ended_early: str | None = None
        maintainer.on(step_points.upload_received, stale_check, nice=40)
        self.folded: RunningFedAvg | None = None
        if fold_uploads:
            if agg_func is not naive_aggregation:
                raise ConfigError(
                    "fold_uploads computes FedAvg as uploads arrive; it needs "
                    f"agg_func=naive_aggregation, got {getattr(agg_func, '__name__', agg_func)!r}"
                )
            self.folded = fold_into_running_mean(maintainer)
        prepare_for_rule(maintainer, agg_func, self.agg_func_kwargs)

    def run(self) -> None:
        """Run every round (in this thread, or in a new one with ``start()``)."""
        try:
            self._run()
        except BaseException as exc:
            self.error = exc
            if threading.current_thread() is threading.main_thread():
                raise
            log.exception("API stopped by an error")

    def _run(self) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=self.rounds,
            initial=self.start_round,
            desc=f"{self.maintainer.nick_name} rounds",
            unit="round",
            disable=not self.progress,
        )
        try:
            for r in range(self.start_round, self.rounds):
                record = self._round(r, "train")
                bar.set_postfix(_postfix(record), refresh=False)
                if self.with_test_round:
                    test = self._round(r, "test")
                    bar.set_postfix(_postfix(test), refresh=False)
                bar.update(1)
                reason = self.maintainer.end_reason
                if reason is not None:
                    self.ended_early = reason
                    log.warning(
                        "%s: training ends after round %d of %d: %s",
                        self.maintainer.nick_name,
                        r,
                        self.rounds,
                        reason,
                    )
                    break
        finally:
            bar.close()

    def _round(self, r: int, mode: str) -> RoundRecord:
        m = self.maintainer
        tic = time.perf_counter()
        before_in, before_out = _traffic(m)
        m.meta["mode"] = mode
        m.meta["round"] = r
        m.meta["rounds"] = self.rounds
        m.meta["test_rounds"] = self.with_test_round
        m.round_metrics.clear()
        if mode == "train":
            m.package(self.optim_list)
        m.step(timeout=self.step_timeout)
        metrics: dict[str, Any] = {}
        aggregated = time.perf_counter()
        if self.folded is not None:
            if mode == "train" and self.folded.count:
                self.folded.apply(self.optim_list)
                finish_aggregation(m, self.optim_list)
            self.folded.reset()
        elif mode == "train" and m.data_list:
            aggregate_and_step(m, self.optim_list, self.agg_func, **self.agg_func_kwargs)
        aggregated = time.perf_counter() - aggregated
        if self.reduce_func is not None and m.meta_list:
            metrics = reduce_isolated(m, self.reduce_func, **self.reduce_func_kwargs)
        if self.evaluate is not None and mode == "train":
            metrics.update(self.evaluate())
        metrics.update(m.round_metrics)
        after_in, after_out = _traffic(m)
        record = RoundRecord(
            round=r,
            mode=mode,
            version=m.version,
            participants=len(m.meta_list),
            bytes_in=after_in - before_in,
            bytes_out=after_out - before_out,
            seconds=time.perf_counter() - tic,
            metrics=metrics,
            aggregate_seconds=aggregated,
        )
        if m.cohort is not None:
            record.cohort = list(m.cohort)
            record.counted = list(m.sender_list)
        m.clear()
        m.update_version()
        keep_record(self.records, self.record_path, record)
        if self.on_round is not None:
            self.on_round(record)
        log.info(
            "round %d (%s): %d participants, %.2f s, %s",
            r,
            mode,
            record.participants,
            record.seconds,
            metrics,
        )
        return record


def prepare_for_rule(
    m: Maintainer, rule: Callable[..., Any], rule_kwargs: Mapping[str, Any]
) -> None:
    """Let ``m`` accept what ``rule`` needs of the uploads.

    A rule names the upload fields it consumes besides ``param`` in an
    ``upload_fields`` attribute (``elastic_aggregation``: ``importance``);
    a rule that needs hooks on the maintainer (``paillier_aggregation``:
    decode encrypted uploads) has a ``setup_maintainer(m, **kwargs)``.
    """
    m.upload_fields.update(getattr(rule, "upload_fields", ()))
    setup = getattr(rule, "setup_maintainer", None)
    if callable(setup):
        setup(m, **rule_kwargs)


def aggregate_and_step(
    m: Maintainer,
    optim_list: Any,
    agg_func: AggregationRule | Callable[..., Any],
    **agg_kwargs: Any,
) -> None:
    """Aggregate ``m``'s received uploads into ``optim_list`` and step the server optimizers.

    ``optim_list`` is one optimizer or a list of them. The rule is called
    through :func:`~zmqfed.functional.agg_rule.call_rule` with the
    optimizers and ``agg_kwargs``, so it installs its result (buffers into the
    model, pseudo-gradients and optimizer state into the optimizers) before
    they step.  An update the rule cannot aggregate (or that makes the
    aggregate non-finite) is dropped with a warning, and the rest aggregated
    (:func:`zmqfed.isolation.aggregate_isolated`). Then the ``aggregated``
    step hooks run, before the optimizers step.
    """
    optims = optim_as_list(optim_list)
    aggregate_isolated(m, optims, agg_func, **agg_kwargs)
    finish_aggregation(m, optims)


def finish_aggregation(m: Maintainer, optims: list[Any]) -> None:
    """After an aggregate is installed: the ``aggregated`` hooks, then the optimizers' step.

    The hooks act on the installed aggregate (differential privacy's noise).
    """
    m.run_step_point(step_points.aggregated, None)
    step_optimizers(optims)


def keep_record(records: deque[Any], path: str | os.PathLike[str] | None, record: Any) -> None:
    """Keep a round's ``record`` in memory and, with ``path``, as one JSON line appended there."""
    records.append(record)
    if path is not None:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(asdict(record)) + "\n")


def step_optimizers(optims: list[Any]) -> None:
    """Step the server optimizers on the pseudo-gradients an aggregation installed."""
    for optim in optims:
        optim.step()
        if hasattr(optim, "round"):
            optim.round()
        if hasattr(optim, "clear_state_dict"):
            optim.clear_state_dict()


def fold_into_running_mean(m: Maintainer, weight_key: str = "instances") -> RunningFedAvg:
    """Fold each counted upload of ``m`` into a running mean as it arrives (see ``API``).

    The upload leaves ``data_list`` at once; ``meta_list`` and
    ``sender_list`` keep it (step policies count them).  An upload with a
    non-finite value is dropped from all three lists with a warning.
    """
    acc = RunningFedAvg(m.state_dict)

    def fold(ctx: StepContext) -> None:
        if ctx.flag is not True or not m.data_list:
            return
        update = m.data_list.pop()
        if not update_is_finite(update):
            sender = m.sender_list.pop()
            m.meta_list.pop()
            log.warning("%s: dropped a non-finite update from %s", m.nick_name, sender)
            return
        acc.add(update, weight=float(m.meta_list[-1].get(weight_key, 1)))

    m.on(step_points.upload_handled, fold, nice=10)
    return acc


def _traffic(m: Maintainer) -> tuple[int, int]:
    stats = m.stats
    return stats["bytes_in"], stats["bytes_out"]


def _postfix(record: RoundRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mode": record.mode,
        "n": record.participants,
        "MB": round((record.bytes_in + record.bytes_out) / 1e6, 2),
    }
    for key, value in record.metrics.items():
        if isinstance(value, float):
            out[key] = round(value, 4)
    return out


def run_collaborator(
    maintainer: Maintainer,
    train: Callable[[Meta], Mapping[str, Any]],
    *,
    fed_optim: Any = None,
    test: Callable[[Meta], Mapping[str, Any]] | None = None,
    rounds: int | None = None,
    timeout: float | None = None,
) -> int:
    """The collaborator's side of :class:`API`: download, train or test, upload; repeat.

    ``train(meta)`` runs local training on the freshly unpackaged model and
    returns metrics for the upload's meta (include ``instances``); ``test``
    evaluates for test rounds. Stops after ``rounds`` steps answered, after
    the federation's last round (the aggregator sends ``round``/``rounds`` in
    its meta), or when the aggregator says it has finished. Returns the number
    of steps answered.
    """
    if not maintainer.collaborator:
        raise ConfigError("run_collaborator runs on a collaborator")
    optims = optim_as_list(fed_optim)
    answered = 0
    wanted = 0
    while rounds is None or answered < rounds:
        maintainer.update_version(wanted)
        try:
            maintainer.step(upload=False, timeout=timeout)
        except PeerOffline as exc:
            log.info("%s: %s", maintainer.nick_name, exc)
            break
        except AggregatorRewound as exc:
            log.warning("%s: %s; redoing that round", maintainer.nick_name, exc)
            wanted = exc.version
            for optim in optims:
                if hasattr(optim, "rewind_to"):
                    optim.rewind_to(wanted)
            continue
        meta = maintainer.meta
        served = meta_version(meta)
        served = served if served >= 0 else wanted
        mode = str(meta.get("mode", "train"))
        maintainer.unpackage(optims)
        wanted = served + 1
        answered += 1
        if meta.get(CONTRIBUTED) is True:
            # This member's update for the round is counted already (this
            # process restarted after uploading it): wait for the next one.
            log.info("%s: version %d already has this node's update", maintainer.nick_name, served)
        elif not _train_and_upload(maintainer, train, test, optims, mode, served, timeout):
            break  # the federation ended while this node trained (a straggler)
        if is_last_round(meta):
            break
    return answered


def _train_and_upload(
    maintainer: Maintainer,
    train: Callable[[Meta], Mapping[str, Any]],
    test: Callable[[Meta], Mapping[str, Any]] | None,
    optims: list[Any],
    mode: str,
    served: int,
    timeout: float | None,
) -> bool:
    """One round's local work and its upload (tagged with the next version).

    False when the aggregator had finished the federation before the upload.
    """
    if mode == "test" and test is not None:
        metrics = test(maintainer.meta)
    else:
        for optim in optims:
            if hasattr(optim, "begin_round"):
                optim.begin_round(served)
        metrics = train(maintainer.meta)
        for optim in optims:
            if hasattr(optim, "round"):
                optim.round()
    maintainer.update_version(served + 1)
    maintainer.meta.update(metrics or {})
    maintainer.meta["mode"] = mode
    maintainer.package(optims)
    finished = False
    try:
        maintainer.step(download=False, timeout=timeout)
    except RemoteError as exc:
        if exc.code not in (ErrorCode.DISCARDED, ErrorCode.ALREADY_COUNTED):
            raise
        log.warning("%s: upload not counted (%s): %s", maintainer.nick_name, exc.code, exc.reason)
    except PeerOffline as exc:
        log.info("%s: upload not sent: %s", maintainer.nick_name, exc)
        finished = True
    for optim in optims:
        if hasattr(optim, "clear_state_dict"):
            optim.clear_state_dict()
    return not finished


def is_last_round(meta: Mapping[str, Any]) -> bool:
    """True when ``meta`` (as served by :class:`API`) is the federation's last exchange.

    That is the last round's training round, or its test round when the
    federation runs test rounds (``meta['test_rounds']``).
    """
    r, total = meta.get("round"), meta.get("rounds")
    if not (isinstance(r, int) and isinstance(total, int) and r >= total - 1):
        return False
    return meta.get("mode", "train") == "test" or meta.get("test_rounds") is not True
