"""Homomorphic aggregation with CKKS (TenSEAL): the aggregator adds ciphertexts and holds no secret key.

The collaborators share a CKKS key (a TenSEAL context with its secret key);
the aggregator gets the same context without it (:meth:`CKKSKeys.public`).
Collaborators encrypt the tensors ``layers`` selects, the aggregator adds
the ciphertexts (CKKS addition needs no key at all) and serves the
encrypted sum as the next model, and every collaborator decrypts it to the
mean on download. Everything else (wire format, placeholders, the blind
aggregate, the clear layers) is the scheme-independent mechanism of
:mod:`zmqfed.functional.encrypted`, shared with Paillier::

    public, secret = ckks_key_gen()  # once; give secret to the collaborators
    # every collaborator, inside `with maintainer:`
    ckks_package(secret, layers=["0.*"])  # encrypt the first layer only
    # aggregator
    API(maintainer, fed_optim, rounds, ckks_aggregation, agg_func_kwargs=dict(keys=public))

Scheme: CKKS (Cheon, Kim, Kim and Song 2017) as implemented by Microsoft
SEAL under TenSEAL. The defaults, ``poly_modulus_degree=8192`` and
``coeff_mod_bit_sizes=(60, 60)`` at scale ``2**40``, give 4096 values per
ciphertext, one 60-bit level (additions consume none) and more than 128-bit
security (HomomorphicEncryption.org standard: up to 218 bits of modulus at
degree 8192); a ciphertext is about 32 bytes per value, 8x float32.
Decryption error is about ``1e-7`` per value for sums of updates of order 1
(docs/privacy.md). A sum must stay below ``2**19`` in magnitude.

On the wire an encrypted field ``f`` is ``f`` = the serialized ciphertexts
(SEAL's own format) concatenated as ``uint8``, and ``f.ckks`` = ``int64
[summands, key id, ndim, *shape, *sizes]``; the receiver checks every size
and the key id before SEAL parses anything, and SEAL's parser refuses
ciphertexts that do not belong to the context. Keys are files in TenSEAL's
serialization (protobuf; the secret one readable by its owner only), never
pickles. Needs the ``he`` extra (``pip install 'zmqfed[he]'``).
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zmqfed.errors import ConfigError, ProtocolError
from zmqfed.functional.agg_common import ParamStates, Update
from zmqfed.functional.encrypted import (
    EncryptedValue,
    ServedAggregate,
    aggregate_encrypted,
    register_encryption,
)

__all__ = [
    "MAX_SUMMANDS",
    "SUFFIX",
    "CKKSCiphertext",
    "CKKSKeys",
    "CKKSScheme",
    "ckks_aggregation",
    "ckks_key_gen",
    "ckks_package",
]

try:
    import tenseal as ts
except ImportError:  # pragma: no cover - the test extra installs it
    ts = None

#: Suffix of the marker field of a CKKS-encrypted field.
SUFFIX = ".ckks"
#: Most updates one sum may hold (the marker's bound; the plaintext bound is the scale's).
MAX_SUMMANDS = 1 << 20
_MAX_DIMS = 32


def _tenseal() -> Any:
    if ts is None:
        raise ConfigError(
            "CKKS aggregation needs TenSEAL: pip install 'zmqfed[he]' (CPython 3.8-3.12 wheels)"
        )
    return ts


class CKKSKeys:
    """A CKKS context: with the secret key (collaborators) or without (the aggregator).

    Make them with :func:`ckks_key_gen`; :meth:`save` / :meth:`load` keep them
    in files.
    """

    def __init__(self, context: Any) -> None:
        self.context = context
        public = context.copy()
        if public.has_secret_key():
            public.make_context_public()
        blob = public.serialize(
            save_secret_key=False, save_galois_keys=False, save_relin_keys=False
        )
        digest = hashlib.sha256(blob).digest()
        #: Identifies the key pair (same for the public and the secret context).
        self.fingerprint = digest[:8].hex()
        #: The fingerprint as the int64 that ciphertext markers carry.
        self.key_id = int.from_bytes(digest[:8], "little", signed=True)
        seal = context.seal_context().data
        parms = seal.key_context_data().parms()
        self.poly_modulus_degree = int(parms.poly_modulus_degree())
        #: Values per ciphertext.
        self.slots = self.poly_modulus_degree // 2
        # SEAL compresses ciphertexts; their coefficients are uniformly random, so one
        # ciphertext's serialized size is every ciphertext's, give or take a little
        typical = len(_tenseal().ckks_vector(public, [0.0]).serialize())
        #: The largest serialized ciphertext accepted.
        self.max_ciphertext_bytes = 2 * typical + 4096
        #: The smallest accepted: no real ciphertext compresses to a quarter of its size.
        self.min_ciphertext_bytes = typical // 4

    @property
    def has_secret_key(self) -> bool:
        """True when these keys can decrypt."""
        return bool(self.context.has_secret_key())

    def public(self) -> CKKSKeys:
        """The same keys without the secret key (what the aggregator gets)."""
        ctx = self.context.copy()
        if ctx.has_secret_key():
            ctx.make_context_public()
        return CKKSKeys(ctx)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write TenSEAL's serialization; a secret context gets mode 0600."""
        blob = self.context.serialize(
            save_secret_key=self.has_secret_key, save_galois_keys=False, save_relin_keys=False
        )
        path = Path(path)
        fd = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if self.has_secret_key else 0o644
        )
        with os.fdopen(fd, "wb") as f:
            f.write(blob)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CKKSKeys:
        """Read keys written by :meth:`save`."""
        tenseal = _tenseal()
        try:
            context = tenseal.context_from(Path(path).read_bytes())
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"{path}: not a TenSEAL CKKS context ({exc})") from None
        return cls(context)

    def __repr__(self) -> str:
        kind = "secret" if self.has_secret_key else "public"
        return f"CKKSKeys({kind}, N={self.poly_modulus_degree}, key={self.fingerprint})"


def ckks_key_gen(
    poly_modulus_degree: int = 8192,
    coeff_mod_bit_sizes: Sequence[int] = (60, 60),
    scale_bits: int = 40,
    n_threads: int | None = None,
) -> tuple[CKKSKeys, CKKSKeys]:
    """Make CKKS keys: ``public, secret = ckks_key_gen()``.

    Parameters
    ----------
    poly_modulus_degree:
        Ring degree N (a power of two); N / 2 values per ciphertext.
    coeff_mod_bit_sizes:
        Bits of the coefficient primes, the last one special (not in
        ciphertexts). Their sum bounds security: at most 218 bits for
        N = 8192, 109 for 4096 (HomomorphicEncryption.org standard, 128-bit).
    scale_bits:
        Fixed-point scale ``2**scale_bits``: precision of the encoding.
    n_threads:
        SEAL's threads (default: the CPU count).
    """
    tenseal = _tenseal()
    sizes = list(coeff_mod_bit_sizes)
    if len(sizes) < 2 or not all(isinstance(b, int) and 20 <= b <= 60 for b in sizes):
        raise ConfigError(
            f"coeff_mod_bit_sizes must be at least two primes of 20-60 bits, got {coeff_mod_bit_sizes!r}"
        )
    if not isinstance(scale_bits, int) or not 20 <= scale_bits < sizes[0]:
        raise ConfigError(f"scale_bits must lie in [20, {sizes[0]}), got {scale_bits!r}")
    try:
        kwargs = {} if n_threads is None else {"n_threads": int(n_threads)}
        context = tenseal.context(
            tenseal.SCHEME_TYPE.CKKS,
            poly_modulus_degree=poly_modulus_degree,
            coeff_mod_bit_sizes=sizes,
            **kwargs,
        )
    except ValueError as exc:
        raise ConfigError(f"invalid CKKS parameters: {exc}") from None
    context.global_scale = 2.0**scale_bits
    secret = CKKSKeys(context)
    return secret.public(), secret


class CKKSCiphertext:
    """The CKKS ciphertexts of one tensor's field; ``a + b`` adds the plaintexts."""

    def __init__(
        self, vectors: list[Any], keys: CKKSKeys, shape: Sequence[int], summands: int = 1
    ) -> None:
        self.vectors = vectors
        self.keys = keys
        self.shape = tuple(int(s) for s in shape)
        self.summands = summands
        self._blobs: list[bytes] | None = None

    @property
    def blobs(self) -> list[bytes]:
        """The serialized ciphertexts."""
        if self._blobs is None:
            self._blobs = [v.serialize() for v in self.vectors]
        return self._blobs

    @property
    def data(self) -> Tensor:
        """The ciphertexts, concatenated, as a ``uint8`` tensor."""
        joined = bytearray(b"".join(self.blobs))
        return (
            torch.frombuffer(joined, dtype=torch.uint8)
            if joined
            else torch.zeros(0, dtype=torch.uint8)
        )

    def marker(self) -> Tensor:
        """``int64 [summands, key id, ndim, *shape, *sizes]``."""
        head = [self.summands, self.keys.key_id, len(self.shape), *self.shape]
        return torch.tensor(head + [len(b) for b in self.blobs], dtype=torch.int64)

    def __add__(self, other: Any) -> CKKSCiphertext:
        if not isinstance(other, CKKSCiphertext):
            return NotImplemented
        if other.keys.key_id != self.keys.key_id:
            raise ConfigError(
                f"cannot add CKKS ciphertexts of different keys ({self.keys.fingerprint} and "
                f"{other.keys.fingerprint})"
            )
        if other.shape != self.shape:
            raise ConfigError(
                f"cannot add ciphertexts of shapes {list(self.shape)} and {list(other.shape)}"
            )
        summands = self.summands + other.summands
        if summands > MAX_SUMMANDS:
            raise ConfigError(f"a CKKS sum holds at most {MAX_SUMMANDS} updates")
        vectors = [a + b for a, b in zip(self.vectors, other.vectors, strict=True)]
        return CKKSCiphertext(vectors, self.keys, self.shape, summands)

    def __repr__(self) -> str:
        return (
            f"CKKSCiphertext(shape={list(self.shape)}, summands={self.summands}, "
            f"ciphertexts={len(self.vectors)}, key={self.keys.fingerprint!r})"
        )


class CKKSScheme:
    """CKKS as a :class:`~zmqfed.functional.encrypted.Scheme`."""

    name = "ckks"
    suffix = SUFFIX

    def __init__(self, keys: CKKSKeys) -> None:
        self.keys = keys

    @property
    def fingerprint(self) -> str:
        return self.keys.fingerprint

    @property
    def can_decrypt(self) -> bool:
        return self.keys.has_secret_key

    def encrypt(self, value: Tensor) -> CKKSCiphertext:
        tenseal, slots = _tenseal(), self.keys.slots
        flat = value.detach().reshape(-1).to(torch.float64)
        if flat.numel() and not bool(torch.isfinite(flat).all()):
            raise ValueError("cannot encrypt inf or NaN")
        vectors = [
            tenseal.ckks_vector(self.keys.context, flat[i : i + slots].tolist())
            for i in range(0, flat.numel(), slots)
        ]
        return CKKSCiphertext(vectors, self.keys, tuple(value.shape))

    def from_wire(self, data: Tensor, marker: Tensor) -> CKKSCiphertext:
        keys, slots = self.keys, self.keys.slots
        if marker.dtype != torch.int64 or marker.dim() != 1 or marker.numel() < 3:
            raise ProtocolError(
                f"a CKKS field's {SUFFIX!r} tensor must be int64 [summands, key, ndim, *shape, *sizes]"
            )
        head = [int(v) for v in marker[:3].tolist()]
        summands, key_id, ndim = head
        if not 1 <= summands <= MAX_SUMMANDS:
            raise ProtocolError(f"a CKKS ciphertext sums 1..{MAX_SUMMANDS} updates, got {summands}")
        if key_id != keys.key_id:
            raise ProtocolError(
                f"ciphertexts of another key (this node has key {keys.fingerprint})"
            )
        if not 0 <= ndim <= _MAX_DIMS or marker.numel() < 3 + ndim:
            raise ProtocolError(f"a CKKS marker with {ndim} dimensions is malformed")
        shape = [int(v) for v in marker[3 : 3 + ndim].tolist()]
        sizes = [int(v) for v in marker[3 + ndim :].tolist()]
        if any(s < 0 for s in shape):
            raise ProtocolError(f"ciphertext shape {shape} has a negative size")
        count = len(sizes)
        if data.dtype != torch.uint8 or data.dim() != 1:
            raise ProtocolError(f"CKKS ciphertexts must be a 1-D uint8 tensor, got {data.dtype}")
        if any(not keys.min_ciphertext_bytes <= s <= keys.max_ciphertext_bytes for s in sizes):
            raise ProtocolError(
                f"a CKKS ciphertext must take {keys.min_ciphertext_bytes}.."
                f"{keys.max_ciphertext_bytes} bytes for key {keys.fingerprint}"
            )
        if sum(sizes) != data.numel():
            raise ProtocolError(
                f"the ciphertext sizes add up to {sum(sizes)}, not {data.numel()} bytes"
            )
        numel = math.prod(shape)  # bounded: count * slots, count bounded by the bytes received
        if count != -(-numel // slots):
            raise ProtocolError(
                f"{numel} values take {-(-numel // slots)} ciphertexts, not {count}"
            )
        raw = data.contiguous().numpy().tobytes()
        tenseal, vectors, offset = _tenseal(), [], 0
        for i, size in enumerate(sizes):
            try:
                vector = tenseal.ckks_vector_from(keys.context, raw[offset : offset + size])
            except Exception as exc:  # SEAL refuses what is not a ciphertext of this context
                raise ProtocolError(f"ciphertext {i} does not parse: {exc}") from None
            want = min(slots, numel - i * slots)
            if vector.size() != want:
                raise ProtocolError(f"ciphertext {i} holds {vector.size()} values, not {want}")
            vectors.append(vector)
            offset += size
        return CKKSCiphertext(vectors, keys, shape, summands)

    def owns(self, value: Any) -> bool:
        if not isinstance(value, CKKSCiphertext):
            return False
        if value.keys.key_id != self.keys.key_id:
            raise ConfigError(
                f"an upload was encrypted with key {value.keys.fingerprint}, not {self.keys.fingerprint}"
            )
        return True

    def decrypt_mean(self, value: EncryptedValue) -> Tensor:
        assert isinstance(value, CKKSCiphertext)
        if not self.keys.has_secret_key:
            raise ConfigError("decrypting needs the secret CKKS key")
        parts = [torch.tensor(v.decrypt(), dtype=torch.float64) for v in value.vectors]
        flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
        return (flat / value.summands).reshape(value.shape)


_served = ServedAggregate()


def _as_keys(keys: CKKSKeys | str | os.PathLike[str]) -> CKKSKeys:
    if isinstance(keys, CKKSKeys):
        return keys
    if isinstance(keys, (str, os.PathLike)):
        return CKKSKeys.load(keys)
    raise ConfigError(f"expected CKKSKeys (or a path to them), got {type(keys).__name__}")


def ckks_package(
    keys: CKKSKeys | str | os.PathLike[str],
    *,
    layers: str | Iterable[str] | Callable[[str], bool] | None = None,
) -> None:
    """Encrypt this node's uploads with CKKS and decrypt its downloads (inside ``with maintainer:``).

    Collaborators pass the secret keys; ``layers`` (name patterns such as
    ``'fc.*'``, or a predicate on the tensor's name; default every
    floating-point tensor) selects what is encrypted, the rest travels in the
    clear. The aggregator passes the public keys (``API`` does it by itself
    for :func:`ckks_aggregation`); secret keys on an aggregator are refused.
    """
    from zmqfed.core import current_maintainer

    maintainer = current_maintainer("ckks_package()")
    k = _as_keys(keys)
    if maintainer.aggregator and k.has_secret_key:
        raise ConfigError(
            "ckks_package: the aggregator must not hold the secret key; give it keys.public()"
        )
    register_encryption(maintainer, CKKSScheme(k), _served, layers)


def ckks_aggregation(
    data_list: Sequence[Update],
    meta_list: Any = None,
    optim_list: Any = None,
    *,
    keys: CKKSKeys | str | os.PathLike[str],
) -> ParamStates:
    """Blind aggregation: add the CKKS uploads, keep the sums encrypted for the key holders.

    The encrypted tensors of the model do not move (the aggregator cannot
    read their mean); the next downloads carry the encrypted sums, which
    the collaborators decrypt to the unweighted mean. Tensors sent in the
    clear are averaged as FedAvg does (unweighted) and installed. ``keys``
    must be public: an aggregator holding the secret key is refused.
    Returns ``{tensor: {field + '.ckks': CKKSCiphertext, 'param': mean of clear ones}}``.
    """
    del meta_list
    k = _as_keys(keys)
    if k.has_secret_key:
        raise ConfigError(
            "ckks_aggregation: the aggregator must not hold the secret key; pass keys.public()"
        )
    return aggregate_encrypted(
        data_list, CKKSScheme(k), _served, decrypt=False, optim_list=optim_list
    )


def _setup_maintainer(maintainer: Any, **agg_kwargs: Any) -> None:
    """What ``API`` calls for :func:`ckks_aggregation`: accept encrypted uploads."""
    from zmqfed.core.context import pop_maintainer, push_maintainer

    if agg_kwargs.get("keys") is None:
        return  # ckks_aggregation itself says what is missing
    push_maintainer(maintainer)
    try:
        ckks_package(agg_kwargs["keys"])
    finally:
        pop_maintainer(maintainer)


ckks_aggregation.setup_maintainer = _setup_maintainer  # type: ignore[attr-defined]
