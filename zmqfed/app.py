"""``App``: what a user supplies to run a node under ``zmqfed-node`` or ``zmqfed-sim``.

A factory ``factory(ctx: NodeContext) -> App`` is named on the command line
as ``MODULE:FACTORY``. It builds the model (identically on every node) and the
functions for the roles the node plays; the daemon runs the rounds, the
checkpoints and the signals.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zmqfed.errors import ConfigError
from zmqfed.meta import Meta
from zmqfed.props import FederatedProperties

if TYPE_CHECKING:
    from zmqfed.core import Maintainer

__all__ = ["App", "NodeContext", "load_factory"]


@dataclass(frozen=True)
class NodeContext:
    """What an app factory knows about the node it builds for."""

    #: This node's nick name.
    name: str
    #: Its federated groups (``topo.analysis``): aggregator group first, if any.
    props: tuple[FederatedProperties, ...]
    #: Training rounds requested on the command line (``None``: the app decides).
    rounds: int | None = None
    #: Free-form options (``--set key=value`` on the command line).
    options: Mapping[str, str] = field(default_factory=dict)

    @property
    def aggregator(self) -> bool:
        """True when the node aggregates a group."""
        return any(p.aggregator for p in self.props)

    @property
    def collaborator(self) -> bool:
        """True when the node collaborates in a group."""
        return any(p.collaborator for p in self.props)

    @property
    def index(self) -> int:
        """Position among its group's sorted collaborators (for data partitions); 0 otherwise."""
        for p in self.props:
            if p.collaborator:
                return p.collaborators.index(self.name)
        return 0

    @property
    def parts(self) -> int:
        """Number of collaborators in the node's (upward) group; 1 for a root."""
        for p in self.props:
            if p.collaborator:
                return len(p.collaborators)
        return 1


@dataclass(kw_only=True)
class App:
    """A federated application.

    Parameters
    ----------
    model:
        The network; built from the same seed on every node.
    train:
        Collaborator: local training on ``model`` after each download;
        returns metrics for the upload (include ``instances``).
    test:
        Collaborator: local evaluation in test rounds.
    evaluate:
        Aggregator: evaluate the global model after each round.
    local_optim:
        Collaborator's ``FederatedOptimizer``; its state travels with uploads.
    server_optim:
        Aggregator's optimizer on the pseudo-gradient (default SGD, lr 1.0).
    agg_func, agg_kwargs:
        The aggregation rule (default FedAvg, ``naive_aggregation``).
    reduce_keys:
        Upload metrics averaged (instance-weighted) into each round's record.
    rounds:
        Training rounds, unless the command line says otherwise.
    min_clients, round_timeout:
        Straggler policy: a round ends at all collaborators, or after
        ``round_timeout`` seconds with at least ``min_clients`` uploads.
    configure:
        Called inside ``with maintainer:`` for every Maintainer the node
        builds, before its first step: register hooks there, e.g.
        ``configure=lambda m: zmqfed.functional.int8_quantization()``.
    sample, fraction, sample_seed, over_select:
        Client sampling (``zmqfed.functional.client_sampling``): each round
        trains ``sample`` (or ``fraction`` of the) collaborators drawn from
        those online, inviting ``over_select`` more; ``round_timeout`` is its
        deadline and ``min_clients`` the uploads it needs then.  The command
        line's ``--set sample=K`` (``fraction``, ``sample_seed``,
        ``over_select``) overrides these; ``--set min_online=N`` waits for N
        online collaborators before each draw.
    partial:
        Collaborators exchange only the trainable tensors of ``model``
        (:func:`zmqfed.partial.trainable_state_dict`: LoRA adapters, a head
        over a frozen backbone); aggregators keep the whole model.
    """

    model: Any
    train: Callable[[Meta], Mapping[str, Any]] | None = None
    test: Callable[[Meta], Mapping[str, Any]] | None = None
    evaluate: Callable[[], Mapping[str, Any]] | None = None
    local_optim: Any = None
    server_optim: Any = None
    agg_func: Callable[..., Any] | None = None
    agg_kwargs: dict[str, Any] = field(default_factory=dict)
    reduce_keys: tuple[str, ...] = ("loss", "accuracy")
    rounds: int = 10
    min_clients: int | None = None
    round_timeout: float | None = None
    configure: Callable[[Maintainer], Any] | None = None
    sample: int | None = None
    fraction: float | None = None
    sample_seed: int = 0
    over_select: float = 0.0
    partial: bool = False

    def __post_init__(self) -> None:
        if self.rounds <= 0:
            raise ConfigError(f"App.rounds must be positive, got {self.rounds!r}")
        if self.round_timeout is not None and self.round_timeout <= 0:
            raise ConfigError("App.round_timeout must be positive seconds")


def load_factory(spec: str) -> Callable[[NodeContext], App]:
    """Import ``MODULE:FACTORY``; a clear ConfigError when either part is wrong."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--app must look like MODULE:FACTORY, got {spec!r}")
    try:
        _prefer_working_directory(module_name.split(".")[0])
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ConfigError(f"--app {spec!r}: {module_name!r} has no callable {attr!r}")
    return factory


def _prefer_working_directory(top: str) -> None:
    """Take the app's top-level package from the working directory, if it has one.

    Node processes put the working directory at the end of ``sys.path`` (so
    a stray ``json.py`` there cannot shadow a real module), which lets an
    installed package of the same name win instead: opacus, for one, installs
    a top-level ``examples``.  The package the user names with ``--app`` and
    keeps in the working directory is the one meant; only that package is
    loaded from there, nothing else moves on ``sys.path``.
    """
    here = Path.cwd() / top
    init = here / "__init__.py"
    if not init.is_file():
        return
    loaded = sys.modules.get(top)
    if loaded is not None and here.resolve() in (
        Path(p).resolve() for p in getattr(loaded, "__path__", ())
    ):
        return
    spec = importlib.util.spec_from_file_location(top, init, submodule_search_locations=[str(here)])
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        del sys.modules[name]  # an installed namesake imported earlier
    sys.modules[top] = module
    spec.loader.exec_module(module)
