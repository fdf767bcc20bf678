"""``topk_sparsification``: the k largest entries of the update, with error feedback."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from numbers import Real

import torch
from torch import Tensor

from zmqfed.core import Maintainer, current_maintainer
from zmqfed.errors import ConfigError
from zmqfed.functional.compress.common import (
    DESCRIPTOR_BYTES,
    INDEX,
    PARAM,
    CompressionStats,
    raise_on,
    register,
)

__all__ = ["topk_sparsification"]

log = logging.getLogger(__name__)


def topk_sparsification(fraction: float = 0.01, *, error_feedback: bool = True) -> CompressionStats:
    """Upload only the largest ``fraction`` of each update's change; the aggregator fills in.

    A collaborator computes ``delta = local - downloaded`` per floating-point
    tensor (the reference is the model it last downloaded,
    ``maintainer.data[name]['param']``) and uploads the ``k = ceil(fraction *
    numel)`` entries of largest magnitude as ``param`` plus their flat
    indices as ``param.index`` (int32; int64 beyond 2**31 elements). The
    aggregator's decoder rebuilds the dense ``global + delta`` from its own
    tensor, which must still be the model the collaborator downloaded (true
    within a round; a stale upload's delta lands on the newer model).

    With ``error_feedback`` (default) the collaborator keeps what it did not
    send (one residual tensor per parameter) and adds it to the next
    update, so every change is eventually sent; without it the unsent part
    of each update is dropped.

    Parameters
    ----------
    fraction:
        Share of each tensor's entries sent, in (0, 1].
    error_feedback:
        Accumulate the unsent remainder on the collaborator (memory: one model).

    Returns
    -------
    CompressionStats

    Notes
    -----
    Upload-only: downloads are not sparsified (the aggregator has no
    reference on the collaborators' side). Only ``param`` is sparsified;
    optimizer state travels dense. A tensor whose sparse form would not be
    smaller is sent dense (with error feedback: ``local + residual``, which
    empties the residual). Before the first download there is no reference:
    the upload is dense and a warning is logged. An upload that fails after
    encoding loses its top-k entries (the residual has moved on).
    """
    maintainer = current_maintainer("topk_sparsification()")
    if isinstance(fraction, bool) or not isinstance(fraction, Real) or not 0 < float(fraction) <= 1:
        raise ConfigError(f"topk_sparsification: fraction must be in (0, 1], got {fraction!r}")
    if not isinstance(error_feedback, bool):
        raise ConfigError(
            f"topk_sparsification: error_feedback must be True or False, got {error_feedback!r}"
        )
    stats = CompressionStats(f"top-{float(fraction):g}")
    if maintainer.aggregator:
        register(
            maintainer,
            "topk_sparsification",
            stats=stats,
            encode=None,
            decode=_topk_decode,
        )
    else:
        encoder = _TopKEncoder(maintainer, float(fraction), error_feedback)
        register(maintainer, "topk_sparsification", stats=stats, encode=encoder, decode=None)
    return stats


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TopKEncoder:
    """The collaborator's top-k package hook and its error-feedback residuals."""

    def __init__(self, maintainer: Maintainer, fraction: float, error_feedback: bool) -> None:
        self.m = maintainer
        self.fraction = fraction
        self.error_feedback = error_feedback
        self.residuals: dict[str, Tensor] = {}
        self._warned = False

    def __call__(self, state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
        param = state.get(PARAM)
        if (
            not isinstance(param, Tensor)
            or not param.is_floating_point()
            or not p.is_floating_point()
            or param.shape != p.shape
        ):
            return state
        reference = self.m.data.get(name, {}).get(PARAM)
        if reference is None or reference.shape != p.shape:
            if not self._warned:
                self._warned = True
                log.warning(
                    "%s: topk_sparsification: no downloaded model to take the update from; "
                    "uploading dense",
                    self.m.nick_name,
                )
            return state
        work = _work_dtype(param.dtype)
        base = reference.detach().to(device=param.device, dtype=work)
        update = param.detach().to(work) - base
        residual = self.residuals.get(name) if self.error_feedback else None
        if residual is not None:
            update += residual
        flat = update.reshape(-1)
        n = flat.numel()
        k = max(1, math.ceil(self.fraction * n))
        index_dtype = torch.int32 if n <= torch.iinfo(torch.int32).max else torch.int64
        sparse = k * (param.element_size() + index_dtype.itemsize)
        if n * param.element_size() - sparse <= DESCRIPTOR_BYTES:
            # dense is as small: send everything, the residual included
            if residual is not None:
                state[PARAM] = (base + update).to(param.dtype)
                del self.residuals[name]
            return state
        index = flat.abs().topk(k, sorted=False).indices
        values = flat[index].to(param.dtype)
        if self.error_feedback:
            flat[index] -= values.to(work)  # what was sent, to the last rounding
            self.residuals[name] = update
        state[PARAM] = values
        state[PARAM + INDEX] = index.to(index_dtype)
        return state


def _topk_decode(state: dict[str, Tensor], p: Tensor, *, name: str) -> dict[str, Tensor]:
    """Aggregator: ``param = p + scatter(values at index)``, dense in ``p``'s dtype."""
    raise_on(_check_topk(state, p))
    index = state.pop(PARAM + INDEX, None)
    if index is None:
        return state
    work = _work_dtype(p.dtype)
    dense = p.detach().to(work).reshape(-1).clone()
    dense.index_add_(0, index.to(device=dense.device, dtype=torch.int64), state[PARAM].to(dense))
    state[PARAM] = dense.reshape(p.shape).to(p.dtype)
    return state


def _check_topk(fields: Mapping[str, Tensor], p: Tensor) -> str | None:
    """Why ``fields`` is not a valid top-k upload (None if it is, or is dense)."""
    for key in fields:
        if key.endswith(INDEX) and key != PARAM + INDEX:
            return f"only 'param' can be sparse, got {key!r}"
    index = fields.get(PARAM + INDEX)
    if index is None:
        return None
    values = fields.get(PARAM)
    if not isinstance(values, Tensor) or not isinstance(index, Tensor):
        return f"{PARAM + INDEX!r} without the values in 'param'"
    if not p.is_floating_point():
        return f"sparse 'param' for a {p.dtype} tensor"
    if index.dtype not in (torch.int32, torch.int64) or index.dim() != 1:
        return f"{PARAM + INDEX!r} must be a 1-d int32/int64 tensor, got {index.dtype} {list(index.shape)}"
    if not values.is_floating_point() or values.shape != index.shape:
        return (
            f"sparse 'param' must hold one floating-point value per index, got {values.dtype} "
            f"{list(values.shape)} for {index.numel()} indices"
        )
    n = p.numel()
    if index.numel() > n:
        return f"{index.numel()} sparse values for a tensor of {n} elements"
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
        return f"{PARAM + INDEX!r} holds indices outside [0, {n})"
    return None
