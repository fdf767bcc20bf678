"""Checking what a node received against its own model, before anything of it is kept.

An aggregator runs these checks on every upload *before* it acknowledges it,
so an upload that could not be aggregated is refused (``bad-upload``) instead
of failing the round later; a collaborator runs them on every download.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import Tensor

from zmqfed.errors import ProtocolError

__all__ = ["check_received", "check_upload_meta"]

log = logging.getLogger(__name__)

#: ``{tensor name: {field: tensor}}``.
Fields = Mapping[str, Mapping[str, Any]]
PARAM = "param"
#: Largest ``instances`` weight accepted (beyond it float sums lose integers).
MAX_INSTANCES = 2**53


def _kind(t: Tensor) -> str:
    """What kind of number a tensor holds: never averaged across kinds."""
    if t.is_complex():
        return "complex"
    if t.is_floating_point():
        return "floating-point"
    return "boolean" if t.dtype == torch.bool else "integer"


def check_received(
    data: Fields,
    own: Mapping[str, Tensor],
    unpackage: Callable[[dict[str, dict[str, Any]]], dict[str, dict[str, Any]]],
    sender: str,
    *,
    fields: Collection[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Check received tensors, run the unpackage hooks on them, check the result.

    Names come first (every local tensor has a ``param``, nothing unknown),
    the rest after the hooks (a compressed ``param`` takes its shape only when
    decoded): each ``param`` has the local tensor's shape and kind of dtype
    (floating-point, integer, boolean, complex); every other field is one of
    ``fields`` (None: any), and a tensor field has the parameter's shape and
    is floating-point or of the parameter's kind (per-parameter optimizer
    state: SCAFFOLD's ``c``, elastic's ``importance``). An upload
    (``fields`` given) breaking a field rule is refused; a download keeps its
    model and drops such fields, with a warning.

    Raises ``ProtocolError`` naming the problem: a missing or unknown tensor,
    a hook that failed on the data (a decoder refusing malformed input, or
    any hook tripping over it), a shape or dtype that differs from the local
    tensor once decoded, or a field that is not accepted here.
    """
    missing = [n for n in own if n not in data or PARAM not in data[n]]
    if missing:
        raise ProtocolError(
            f"data from {sender!r} lacks {len(missing)} tensors, e.g. {missing[:3]}"
        )
    extra = [n for n in data if n not in own]
    if extra:
        raise ProtocolError(
            f"data from {sender!r} has {len(extra)} unknown tensors, e.g. {extra[:3]}"
        )
    try:
        decoded = unpackage({k: dict(v) for k, v in data.items()})
    except ProtocolError as exc:
        raise ProtocolError(f"data from {sender!r}: {exc}") from exc
    except Exception as exc:  # a hook fed hostile data must not take the node down
        raise ProtocolError(
            f"data from {sender!r}: unpackage hooks failed ({type(exc).__name__}: {exc})"
        ) from exc
    dropped: list[str] = []
    for name, p in own.items():
        state = decoded.get(name) if isinstance(decoded, Mapping) else None
        got = state.get(PARAM) if isinstance(state, Mapping) else None
        if not isinstance(got, Tensor) or got.shape != p.shape:
            shape = list(got.shape) if isinstance(got, Tensor) else type(got).__name__
            raise ProtocolError(
                f"data from {sender!r}: {name!r} has shape {shape}, expected {list(p.shape)}"
            )
        if _kind(got) != _kind(p):
            raise ProtocolError(
                f"data from {sender!r}: {name!r} is {_kind(got)} ({got.dtype}), "
                f"the model's is {_kind(p)} ({p.dtype})"
            )
        assert isinstance(state, dict)  # a copy the hooks returned, holding a param tensor
        for field, value in list(state.items()):
            if field == PARAM:
                continue
            if fields is not None and field not in fields:
                raise ProtocolError(
                    f"data from {sender!r}: field {field!r} of {name!r} is not accepted here "
                    f"(accepted: {sorted(fields) or 'param only'})"
                )
            if isinstance(value, Tensor) and (
                value.shape != p.shape or _kind(value) not in ("floating-point", _kind(p))
            ):
                problem = (
                    f"data from {sender!r}: field {field!r} of {name!r} is {_kind(value)} of "
                    f"shape {list(value.shape)}; state travels floating-point (or as the "
                    f"parameter, {_kind(p)}) in the parameter's shape {list(p.shape)}"
                )
                if fields is not None:  # an upload: refused
                    raise ProtocolError(problem)
                del state[field]  # a download: the model is good, this state is not
                dropped.append(problem)
    if dropped:
        log.warning("%s (%d such fields dropped, the rest kept)", dropped[0], len(dropped))
    return decoded


def check_upload_meta(meta: Mapping[str, Any], sender: str) -> None:
    """Refuse upload meta an aggregation cannot use: ``instances`` must be a finite weight >= 0."""
    if "instances" not in meta:
        return
    value = meta["instances"]
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not 0 <= value <= MAX_INSTANCES
    ):
        raise ProtocolError(
            f"upload from {sender!r}: meta['instances'] must be a number in [0, 2**53], "
            f"got {str(value)[:40]!r}"
        )
