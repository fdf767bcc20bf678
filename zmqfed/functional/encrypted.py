"""Fields that travel encrypted and that the aggregator adds up without a key: one mechanism, any scheme.

An additively homomorphic scheme (Paillier in :mod:`zmqfed.functional.paillier`,
CKKS in :mod:`zmqfed.functional.ckks`) plugs in as a :class:`Scheme`; this
module does the rest, the same way for both:

* **On the wire** only tensors travel: an encrypted field ``f`` is sent as
  ``f`` = the ciphertexts as a ``uint8`` tensor and ``f + scheme.suffix`` =
  an ``int64`` marker whose first entry is the number of updates summed (the
  rest is the scheme's: the shape, sizes). The receiver rebuilds and checks
  the ciphertexts (:meth:`Scheme.from_wire`) before it computes with them;
  a malformed field is refused as a bad upload, never unpickled.
* **Collaborators** (:func:`register_encryption`) encrypt the floating-point
  fields of the tensors ``layers`` selects (by name pattern; the rest travel
  in the clear) and decrypt an encrypted download to the mean of the
  updates it sums.
* **The aggregator** keeps each encrypted ``param`` as a placeholder of its
  shape that takes no memory, and the ciphertexts beside it;
  :func:`aggregate_encrypted` adds them up, averages the clear fields as
  FedAvg does, and either decrypts (a key holder) or keeps the sums to serve
  them as the next model (a blind aggregator, :class:`ServedAggregate`).
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.functional.agg_common import (
    ParamStates,
    Update,
    add_pseudo_gradients,
    install_if_given,
)
from zmqfed.functional.running_mean import RunningFedAvg

__all__ = [
    "DECRYPT_NICE",
    "ENCRYPT_NICE",
    "EncryptedValue",
    "Scheme",
    "ServedAggregate",
    "aggregate_encrypted",
    "encrypted_fields",
    "layer_selector",
    "placeholder",
    "register_encryption",
]

ENCRYPT_NICE = 200  # after every other package hook (device_alignment: 100; local DP: 150)
DECRYPT_NICE = -100  # before every other unpackage hook (device_alignment: 0)


class EncryptedValue(Protocol):
    """The ciphertexts of one field of one tensor; ``a + b`` adds the plaintexts."""

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the plaintext tensor."""
        ...

    @property
    def summands(self) -> int:
        """How many updates this sums."""
        ...

    @property
    def data(self) -> Tensor:
        """The ciphertexts as a ``uint8`` tensor."""
        ...

    def marker(self) -> Tensor:
        """The ``int64`` tensor sent as ``field + suffix`` (``[summands, ...]``)."""
        ...

    def __add__(self, other: Any) -> Any: ...


class Scheme(Protocol):
    """An additively homomorphic encryption of float tensors, as this module needs it."""

    #: Short name for messages ("paillier", "ckks").
    name: str
    #: Suffix of the marker field (".paillier", ".ckks").
    suffix: str

    @property
    def fingerprint(self) -> str:
        """Identifies the key: values of different keys must never be added."""
        ...

    @property
    def can_decrypt(self) -> bool:
        """Whether this node holds the secret key."""
        ...

    def encrypt(self, value: Tensor) -> EncryptedValue:
        """Encrypt a float tensor (any shape)."""
        ...

    def from_wire(self, data: Tensor, marker: Tensor) -> EncryptedValue:
        """Rebuild and fully check received ciphertexts; ``ProtocolError`` when malformed."""
        ...

    def owns(self, value: Any) -> bool:
        """Whether ``value`` is an encrypted value of this scheme's key."""
        ...

    def decrypt_mean(self, value: EncryptedValue) -> Tensor:
        """The mean of the ``value.summands`` updates ``value`` sums (needs the secret key)."""
        ...


class ServedAggregate:
    """A blind aggregator's encrypted aggregate per tensor, kept until it is served."""

    def __init__(self) -> None:
        self._items: dict[int, tuple[weakref.ref[Tensor], dict[str, EncryptedValue]]] = {}

    def put(self, p: Tensor, fields: dict[str, EncryptedValue]) -> None:
        """Serve ``fields`` (encrypted) for ``p`` from now on; ``{}``: serve ``p`` in the clear."""
        key = id(p)
        self._items[key] = (weakref.ref(p, lambda _ref: self._items.pop(key, None)), fields)

    def get(self, p: Tensor) -> dict[str, EncryptedValue] | None:
        """What is served for ``p`` (None: nothing encrypted)."""
        item = self._items.get(id(p))
        return item[1] if item is not None and item[0]() is p else None


def encrypted_fields(state: Mapping[str, Any], suffix: str) -> list[str]:
    """The fields of ``state`` that carry ciphertexts (their marker ``f + suffix`` is present)."""
    return [k[: -len(suffix)] for k in state if k.endswith(suffix) and k[: -len(suffix)] in state]


def placeholder(p: Tensor, shape: Sequence[int]) -> Tensor:
    """A tensor of ``shape`` that takes no memory: the decrypted value is not known here."""
    return torch.zeros((), dtype=p.dtype if p.is_floating_point() else torch.float32).expand(*shape)


def layer_selector(
    layers: str | Iterable[str] | Callable[[str], bool] | None,
) -> Callable[[str], bool]:
    """Which tensors to encrypt: None (all), name patterns (``fnmatch``: ``'fc.*'``) or a predicate."""
    if layers is None:
        return lambda name: True
    if callable(layers):
        return layers
    patterns = (layers,) if isinstance(layers, str) else tuple(layers)
    if not patterns or not all(isinstance(p, str) and p for p in patterns):
        raise ConfigError(f"layers must be name patterns (e.g. 'fc.*'), got {layers!r}")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def register_encryption(
    maintainer: Any,
    scheme: Scheme,
    served: ServedAggregate,
    layers: str | Iterable[str] | Callable[[str], bool] | None = None,
) -> None:
    """Encrypt what ``maintainer`` sends and handle what it receives (see the module docstring).

    Idempotent for one key (``API`` may register the aggregator's part again);
    a second key on the same maintainer is a ConfigError.
    """
    selected = layer_selector(layers)
    registered: dict[str, str] = maintainer.__dict__.setdefault("_encryption_keys", {})
    known = registered.get(scheme.suffix)
    if known is not None:
        if known != scheme.fingerprint:
            raise ConfigError(
                f"{maintainer.nick_name}: {scheme.name} encryption was already set up with key "
                f"{known}, not {scheme.fingerprint}"
            )
        return
    registered[scheme.suffix] = scheme.fingerprint
    suffix = scheme.suffix
    if maintainer.aggregator:  # encrypted uploads carry, for each field, its ciphertexts' marker
        fields = {"param", *maintainer.upload_fields}
        maintainer.upload_fields.update(f + suffix for f in fields)

    def receive(state: dict[str, Any], p: Tensor) -> dict[str, Any]:
        for field in encrypted_fields(state, suffix):
            value = scheme.from_wire(state[field], state.pop(field + suffix))
            if maintainer.aggregator:  # keep the ciphertexts; the aggregation adds them up
                state[field] = placeholder(p, value.shape)
                state[field + suffix] = value
            elif not scheme.can_decrypt:
                raise ProtocolError(
                    f"the aggregator served a {scheme.name}-encrypted model, but this node has no "
                    "secret key to decrypt it"
                )
            else:
                mean = scheme.decrypt_mean(value)
                state[field] = mean.to(p.dtype if p.is_floating_point() else torch.float32)
        return state

    def send(state: dict[str, Any], p: Tensor, *, name: str) -> dict[str, Any]:
        if maintainer.aggregator:
            for field, value in (served.get(p) or {}).items():
                state[field] = value.data
                state[field + suffix] = value.marker()
            return state
        if not selected(name):
            return state
        for field, value in list(state.items()):
            if isinstance(value, Tensor) and value.is_floating_point():
                encrypted = scheme.encrypt(value.detach().cpu())
                state[field] = encrypted.data
                state[field + suffix] = encrypted.marker()
        return state

    maintainer.register_unpackage_hook(DECRYPT_NICE, receive)
    maintainer.register_package_hook(ENCRYPT_NICE, send)


def aggregate_encrypted(
    data_list: Sequence[Update],
    scheme: Scheme,
    served: ServedAggregate,
    *,
    decrypt: bool,
    optim_list: Any = None,
) -> ParamStates:
    """Add up the encrypted fields of ``data_list``; average the clear ones; decrypt or keep.

    ``decrypt`` (a key holder): every encrypted sum becomes the plain mean,
    installed like any rule's result, and the model is served in the clear.
    Otherwise (a blind aggregator) the sums are kept in ``served`` for the
    next downloads and returned under ``field + suffix``; the model's
    encrypted tensors do not move. Clear fields (integer buffers, tensors
    ``layers`` left out) are averaged as FedAvg does.
    """
    suffix = scheme.suffix
    sums: dict[Any, dict[str, EncryptedValue]] = {}
    plain = RunningFedAvg()
    for update in data_list:
        clear: dict[Any, dict[str, Tensor]] = {}
        for p, state in update.items():
            encrypted = set(encrypted_fields(state, suffix))
            for name, value in state.items():
                if name.endswith(suffix) and name[: -len(suffix)] in encrypted:
                    if not scheme.owns(value):
                        raise ConfigError(
                            f"an upload's {name!r} is not a {scheme.name} ciphertext of key "
                            f"{scheme.fingerprint}"
                        )
                    field = name[: -len(suffix)]
                    slot = sums.setdefault(p, {})
                    slot[field] = slot[field] + value if field in slot else value
                elif name not in encrypted:
                    clear.setdefault(p, {})[name] = value
        if clear:
            plain.add(clear, 1.0)
    param_states: ParamStates = plain.result() if plain.count else {}
    if not decrypt:
        for p, fields in sums.items():
            if isinstance(p, Tensor):
                served.put(p, fields)
            param_states.setdefault(p, {}).update({f + suffix: v for f, v in fields.items()})  # type: ignore[misc]
        add_pseudo_gradients(param_states)
        # the optimizers get the clear part only: ciphertexts are served, not optimizer state
        # (which would also end up in checkpoints)
        clear_part = {
            p: {k: v for k, v in state.items() if isinstance(v, Tensor)}
            for p, state in param_states.items()
        }
        install_if_given(clear_part, optim_list)
        return param_states
    for p, fields in sums.items():
        state = param_states.setdefault(p, {})
        for field, value in fields.items():
            dtype = p.dtype if isinstance(p, Tensor) and p.is_floating_point() else torch.float32
            state[field] = scheme.decrypt_mean(value).to(dtype)
        if isinstance(p, Tensor):
            served.put(p, {})  # the model is served in the clear again
    return install_if_given(add_pseudo_gradients(param_states), optim_list)
