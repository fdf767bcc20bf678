"""Checking what a node received against its own model, before anything of it is kept."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

from zmqfed.errors import ProtocolError

__all__ = ["check_received"]

#: ``{tensor name: {field: tensor}}``.
Fields = Mapping[str, Mapping[str, Tensor]]


def check_received(
    data: Fields,
    own: Mapping[str, Tensor],
    unpackage: Callable[[dict[str, dict[str, Tensor]]], dict[str, dict[str, Tensor]]],
    sender: str,
) -> dict[str, dict[str, Tensor]]:
    """Check received tensors, run the unpackage hooks on them, check the result.

    Names come first (every local tensor has a ``param``, nothing unknown),
    shapes only after the hooks: a compressed ``param`` may take its shape
    only when decoded.

    Raises ``ProtocolError`` naming the problem: a missing or unknown tensor,
    a hook that failed on the data (a decoder refusing malformed input, or
    any hook tripping over it), or a shape that differs from the local tensor
    once decoded.
    """
    missing = [n for n in own if n not in data or "param" not in data[n]]
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
    for name, p in own.items():
        got = decoded[name]["param"]
        if got.shape != p.shape:
            raise ProtocolError(
                f"data from {sender!r}: {name!r} has shape {list(got.shape)}, "
                f"expected {list(p.shape)}"
            )
    return decoded
