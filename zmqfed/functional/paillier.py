"""Encrypted aggregation with the Paillier cryptosystem (OpenFed's API, real Paillier).

Collaborators encrypt their updates with a public key; the aggregator
multiplies ciphertexts, which adds the plaintexts underneath, without being
able to read any of them; whoever holds the private key decrypts the sum
and divides by the number of updates: FedAvg's unweighted mean, within
fixed-point error (``2**-precision / 2`` per value).

Two ways to run it:

* **Blind aggregator** (the point of encrypting): the collaborators share the
  key pair, the aggregator has only the public key. It serves the encrypted
  sum as the next model, and each collaborator decrypts it on download::

      # every node, inside `with maintainer:`
      paillier_package(public_key, private_key)  # aggregator: paillier_package(public_key)
      # aggregator
      API(
          maintainer,
          fed_optim,
          rounds,
          paillier_aggregation,
          agg_func_kwargs=dict(public_key=public_key),
      )

* **OpenFed's way**: collaborators call ``paillier_package(public_key)``; the
  aggregator holds the private key and decrypts the sum itself
  (``agg_func_kwargs=dict(private_key=private_key)``), then serves the model
  in the clear. The aggregator can read the sum only, but, holding the key,
  it could decrypt each upload too.

Scheme
------
Textbook Paillier with ``g = n + 1``: ``E(m) = (1 + m n) r^n mod n^2``,
``E(a) E(b) = E(a + b)``. Decryption uses the CRT. Floats become fixed-point
integers ``round((x + bound) * 2**precision)`` in ``[0, 2 * bound *
2**precision]`` (:func:`float_to_long`), and many of them are packed into one
plaintext, each in a slot wide enough for the sum of ``max_summands`` of
them, so slots never carry into each other. With the defaults (2048-bit
key, ``precision=24``, ``bound=8``, ``max_summands=4095``) a slot is 5 bytes
and a 512-byte ciphertext carries 51 values: about 10 bytes per float32
value, 2.5x the plain model. A node that holds the private key encrypts with
the CRT too (same distribution of ciphertexts, about 3x faster).

Python's big integers are slow at this: install ``gmpy2`` (``pip install
'zmqfed[paillier]'``), which this module uses when present, for about 8x
(``ZMQFED_PAILLIER_BIGINT=python`` ignores it, to compare).
Measured times and bytes per round for a 1M-parameter model are in
``docs/encrypted-aggregation.md``.

On the wire
-----------
Only tensors travel (nothing is pickled): an encrypted field ``f`` (``param``
or a floating-point optimizer state) becomes ``f`` = the ciphertexts as a
``uint8`` tensor ``[count, 2 * key bytes]`` (little-endian integers) and
``f.paillier`` = an ``int64`` tensor ``[summands, *shape]``. Integer
tensors (BatchNorm's ``num_batches_tracked``) travel in the clear and are
averaged as usual. The receiver checks every size and every ciphertext's
range before it computes with them.

Keys are JSON files (:meth:`PublicKey.save`, :meth:`PrivateKey.save`, the
private one readable by its owner only), never pickles.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import secrets
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
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
    "BIGINT_BACKEND",
    "SUFFIX",
    "Ciphertext",
    "PaillierScheme",
    "PrivateKey",
    "PublicKey",
    "float_to_long",
    "key_gen",
    "long_to_float",
    "paillier_aggregation",
    "paillier_dec",
    "paillier_enc",
    "paillier_package",
]

log = logging.getLogger(__name__)

try:  # GMP's arithmetic when available: the same numbers, several times faster
    if os.environ.get("ZMQFED_PAILLIER_BIGINT") == "python":  # measure the fallback
        raise ImportError("ZMQFED_PAILLIER_BIGINT=python")
    import gmpy2

    _mpz: Callable[[Any], Any] = gmpy2.mpz
    _powmod: Callable[[Any, Any, Any], Any] = gmpy2.powmod
    BIGINT_BACKEND = "gmpy2"
except ImportError:  # pragma: no cover - the test extra installs gmpy2
    gmpy2 = None
    _mpz = int
    _powmod = pow
    BIGINT_BACKEND = "python"

#: Suffix of the field that marks an encrypted field ``f`` and carries ``[summands, *shape]``.
SUFFIX = ".paillier"
PARAM = "param"
_KIND_PUBLIC = "zmqfed-paillier-public-key"
_KIND_PRIVATE = "zmqfed-paillier-private-key"
_MIN_KEY_SIZE = 1024  # below this, factoring n is practical


# --------------------------------------------------------------------------- keys


def _is_probable_prime(n: int, rounds: int = 40) -> bool:
    """Miller-Rabin with random bases (deterministic small-prime checks first)."""
    if gmpy2 is not None:
        return bool(gmpy2.is_prime(n, rounds))
    if n < 2:
        return False
    for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
        if n % p == 0:
            return n == p
    d, s = n - 1, 0
    while d % 2 == 0:
        d //= 2
        s += 1
    for _ in range(rounds):
        a = 2 + secrets.randbelow(n - 3)
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


_SMALL_PRIMES = [p for p in range(3, 2000) if all(p % d for d in range(2, int(p**0.5) + 1))]


def _random_prime(bits: int) -> int:
    """A random prime of exactly ``bits`` bits with its two top bits set."""
    while True:
        candidate = secrets.randbits(bits) | (3 << (bits - 2)) | 1
        if any(candidate % p == 0 for p in _SMALL_PRIMES):
            continue
        if _is_probable_prime(candidate):
            return candidate


class _KeyParams:
    """Fixed-point and packing parameters shared by both keys."""

    n: int
    precision: int
    bound: float
    max_summands: int

    def _init_params(self, precision: int, bound: float, max_summands: int) -> None:
        if (
            isinstance(precision, bool)
            or not isinstance(precision, int)
            or not 0 <= precision <= 52
        ):
            raise ConfigError(
                f"precision must be an integer number of bits in [0, 52], got {precision!r}"
            )
        bound = float(bound)
        if not (math.isfinite(bound) and bound > 0):
            raise ConfigError(f"bound must be a positive number, got {bound!r}")
        if isinstance(max_summands, bool) or not isinstance(max_summands, int) or max_summands < 1:
            raise ConfigError(f"max_summands must be an integer >= 1, got {max_summands!r}")
        self.precision = precision
        self.bound = bound
        self.max_summands = max_summands
        #: Largest fixed-point value of one update: ``2 * bound * 2**precision``.
        self.value_max = round(2 * bound * 2**precision)
        if self.value_max >= 2**62:
            raise ConfigError("bound * 2**precision is too large for int64 fixed-point values")
        #: Bytes per packed value: room for the sum of ``max_summands`` of them.
        self.slot_bytes = -(-(self.value_max * max_summands).bit_length() // 8)
        #: Values per ciphertext.
        self.slots = ((self.n.bit_length() - 1) // 8) // self.slot_bytes
        if self.slots < 1:
            raise ConfigError(
                f"a {self.n.bit_length()}-bit key cannot hold one {self.slot_bytes}-byte value; "
                "use a larger key or a smaller precision, bound or max_summands"
            )
        #: Bytes of one ciphertext (an integer below ``n**2``).
        self.ciphertext_bytes = -(-(self.n * self.n).bit_length() // 8)

    @property
    def key_size(self) -> int:
        """Bits of the modulus ``n``."""
        return self.n.bit_length()

    @property
    def bits_safe(self) -> int:
        """OpenFed's name for the fixed-point fraction bits (:attr:`precision`)."""
        return self.precision

    @property
    def fingerprint(self) -> str:
        """A short hash of the public key, to tell keys apart in logs and errors."""
        return hashlib.sha256(self.n.to_bytes(self.ciphertext_bytes, "big")).hexdigest()[:16]

    def _params(self) -> dict[str, Any]:
        return {"precision": self.precision, "bound": self.bound, "max_summands": self.max_summands}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(key_size={self.key_size}, precision={self.precision}, "
            f"bound={self.bound}, max_summands={self.max_summands}, slots={self.slots}, "
            f"fingerprint={self.fingerprint!r})"
        )


def _read_key_file(path: str | os.PathLike[str], kind: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{os.fspath(path)}: cannot read a zmqfed Paillier key ({exc})") from exc
    if not isinstance(data, dict) or data.get("kind") != kind:
        found = data.get("kind") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(f"{os.fspath(path)}: expected a {kind}, found {found!r}")
    return data


def _hex_int(data: Mapping[str, Any], name: str, path: str | os.PathLike[str]) -> int:
    try:
        return int(str(data[name]), 16)
    except (KeyError, ValueError):
        raise ConfigError(f"{os.fspath(path)}: key field {name!r} is missing or not hex") from None


class PublicKey(_KeyParams):
    """The key that encrypts and adds: modulus ``n`` and the fixed-point parameters.

    Parameters
    ----------
    n:
        The Paillier modulus.
    precision:
        Fraction bits of the fixed-point values (OpenFed's ``bits_safe``).
    bound:
        Values must lie in ``[-bound, bound]``.
    max_summands:
        The most updates one sum may hold; sets the slot width.
    """

    def __init__(
        self, n: int, precision: int = 24, bound: float = 8.0, max_summands: int = 4095
    ) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n.bit_length() < _MIN_KEY_SIZE:
            raise ConfigError(
                f"a Paillier modulus must be an integer of at least {_MIN_KEY_SIZE} bits"
            )
        self.n = n
        self._init_params(precision, bound, max_summands)
        self.nsquare = n * n
        self._n = _mpz(n)
        self._nsquare = _mpz(self.nsquare)

    def state_dict(self) -> dict[str, Any]:
        """The key as a JSON-safe dict (what :meth:`save` writes)."""
        return {"kind": _KIND_PUBLIC, "n": format(self.n, "x"), **self._params()}

    def save(self, key_file: str | os.PathLike[str]) -> None:
        """Write the key as JSON."""
        Path(key_file).write_text(json.dumps(self.state_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, key_file: str | os.PathLike[str]) -> PublicKey:
        """Read a key written by :meth:`save`."""
        data = _read_key_file(key_file, _KIND_PUBLIC)
        return cls(_hex_int(data, "n", key_file), **_params_of(data))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _KeyParams):
            return NotImplemented
        return self.n == other.n and self._params() == other._params()

    def __hash__(self) -> int:
        return hash(self.n)


class PrivateKey(_KeyParams):
    """The key that decrypts: the factors ``p`` and ``q`` of ``n``; :attr:`public_key` is its pair."""

    def __init__(
        self, p: int, q: int, precision: int = 24, bound: float = 8.0, max_summands: int = 4095
    ) -> None:
        if p == q or p < 3 or q < 3:
            raise ConfigError("a Paillier private key needs two distinct odd primes")
        self.p, self.q = p, q
        self.n = p * q
        self._init_params(precision, bound, max_summands)
        if math.gcd(self.n, (p - 1) * (q - 1)) != 1:
            raise ConfigError("gcd(n, (p-1)(q-1)) must be 1 for a Paillier key")
        self.public_key = PublicKey(self.n, precision, bound, max_summands)
        self._p, self._q = _mpz(p), _mpz(q)
        self._psquare, self._qsquare = self._p * self._p, self._q * self._q
        # CRT decryption: m_p = L_p(c^(p-1) mod p^2) * h_p mod p, with g = n + 1
        self._hp = _invert(
            _l_function(_powmod(_mpz(self.n + 1), self._p - 1, self._psquare), self._p), self._p
        )
        self._hq = _invert(
            _l_function(_powmod(_mpz(self.n + 1), self._q - 1, self._qsquare), self._q), self._q
        )
        self._q_inv_p = _invert(self._q, self._p)
        self._qsq_inv_psq = _invert(self._qsquare, self._psquare)

    def state_dict(self) -> dict[str, Any]:
        """The key as a JSON-safe dict (what :meth:`save` writes)."""
        return {
            "kind": _KIND_PRIVATE,
            "p": format(self.p, "x"),
            "q": format(self.q, "x"),
            **self._params(),
        }

    def save(self, key_file: str | os.PathLike[str]) -> None:
        """Write the key as JSON, readable and writable by its owner only."""
        path = Path(key_file)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.state_dict(), indent=2) + "\n")
        os.chmod(path, 0o600)

    @classmethod
    def load(cls, key_file: str | os.PathLike[str]) -> PrivateKey:
        """Read a key written by :meth:`save`."""
        data = _read_key_file(key_file, _KIND_PRIVATE)
        return cls(_hex_int(data, "p", key_file), _hex_int(data, "q", key_file), **_params_of(data))

    def random_nth_residue(self) -> Any:
        """``r**n mod n**2`` for a uniform ``r``, computed by the CRT (3x faster than ``pow``).

        Modulo ``p**2`` an n-th residue of ``r`` is the p-th power of a
        uniform unit modulo ``p`` (``(r**q)**p``, and ``r -> r**q`` permutes
        the units), so two half-size exponentiations give the same
        distribution as the public computation.
        """
        rp = _powmod(_mpz(1 + secrets.randbelow(self.p - 1)), self._p, self._psquare)
        rq = _powmod(_mpz(1 + secrets.randbelow(self.q - 1)), self._q, self._qsquare)
        return rq + self._qsquare * ((rp - rq) * self._qsq_inv_psq % self._psquare)

    def decrypt_int(self, c: Any) -> int:
        """The plaintext of one ciphertext integer."""
        mp = _l_function(_powmod(c, self._p - 1, self._psquare), self._p) * self._hp % self._p
        mq = _l_function(_powmod(c, self._q - 1, self._qsquare), self._q) * self._hq % self._q
        return int(mq + self._q * ((mp - mq) * self._q_inv_p % self._p))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivateKey):
            return NotImplemented
        return (self.p, self.q) == (other.p, other.q) and self._params() == other._params()

    def __hash__(self) -> int:
        return hash(self.n)


def _invert(a: Any, m: Any) -> Any:
    return gmpy2.invert(a, m) if gmpy2 is not None else pow(a, -1, m)


def _l_function(x: Any, p: Any) -> Any:
    return (x - 1) // p


def _params_of(data: Mapping[str, Any]) -> dict[str, Any]:
    return {k: data[k] for k in ("precision", "bound", "max_summands") if k in data}


def key_gen(
    key_size: int = 2048,
    precision: int = 24,
    bound: float = 8.0,
    max_summands: int = 4095,
    **openfed_options: Any,
) -> tuple[PublicKey, PrivateKey]:
    """Make a Paillier key pair: ``public_key, private_key = key_gen()``.

    Parameters
    ----------
    key_size:
        Bits of the modulus. 2048 (the default) is rated for about 112-bit
        security (NIST SP 800-57, until 2030); 3072 for 128 bits, at about 3.4x
        the time per ciphertext (and 1.5x the values per ciphertext).
    precision:
        Fraction bits of the fixed-point encoding (error at most
        ``2**-(precision + 1)`` per value and update).
    bound:
        Every encrypted value must lie in ``[-bound, bound]``.
    max_summands:
        The most updates one aggregate may add up.

    OpenFed's key_gen made keys of an LWE scheme (``n_lwe``, ``bits``,
    ``lines``); those parameters mean nothing here and are refused.
    """
    if openfed_options:
        names = ", ".join(sorted(openfed_options))
        raise ConfigError(
            f"key_gen: {names} belonged to OpenFed's LWE-based scheme; zmqfed's Paillier "
            "keys take key_size, precision, bound and max_summands"
        )
    if (
        isinstance(key_size, bool)
        or not isinstance(key_size, int)
        or key_size < _MIN_KEY_SIZE
        or key_size % 2
    ):
        raise ConfigError(
            f"key_size must be an even number of bits >= {_MIN_KEY_SIZE}, got {key_size!r}"
        )
    while True:
        p = _random_prime(key_size // 2)
        q = _random_prime(key_size // 2)
        if p != q and (p * q).bit_length() == key_size and math.gcd(p * q, (p - 1) * (q - 1)) == 1:
            break
    private = PrivateKey(p, q, precision, bound, max_summands)
    return private.public_key, private


def _as_public(key: PublicKey | PrivateKey | str | os.PathLike[str]) -> PublicKey:
    if isinstance(key, PrivateKey):
        return key.public_key
    if isinstance(key, PublicKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        return PublicKey.load(key)
    raise ConfigError(f"expected a PublicKey (or a path to one), got {type(key).__name__}")


def _as_private(key: PrivateKey | str | os.PathLike[str]) -> PrivateKey:
    if isinstance(key, PrivateKey):
        return key
    if isinstance(key, (str, os.PathLike)):
        return PrivateKey.load(key)
    raise ConfigError(f"expected a PrivateKey (or a path to one), got {type(key).__name__}")


# ------------------------------------------------------------------- fixed point


def float_to_long(public_key: PublicKey | PrivateKey, tensor: Tensor) -> Tensor:
    """Fixed-point ``int64`` values ``round((x + bound) * 2**precision)``.

    Raises ``ValueError`` naming the largest magnitude when a value lies
    outside ``[-bound, bound]`` (or is not finite): it would wrap into
    another slot's value after encryption.
    """
    x = tensor.detach().to(torch.float64)
    bound = public_key.bound
    finite = bool(torch.isfinite(x).all())
    if x.numel() and not (finite and x.abs().max() <= bound):
        worst = x[~torch.isfinite(x)][0] if not finite else x.abs().max()
        raise ValueError(
            f"cannot encrypt {worst.item()!r}: values must lie in "
            f"[-{bound:g}, {bound:g}]; make keys with a larger bound (key_gen(bound=...))"
        )
    return torch.round((x + bound) * float(2**public_key.precision)).to(torch.int64)


def long_to_float(
    private_key: PublicKey | PrivateKey, tensor: Tensor, denominator: float
) -> Tensor:
    """The mean of ``denominator`` fixed-point values from their sum (``float64``)."""
    if not denominator > 0:
        raise ValueError(f"denominator must be positive, got {denominator!r}")
    return (
        tensor.to(torch.float64) / float(2**private_key.precision) / float(denominator)
        - private_key.bound
    )


# ------------------------------------------------------------------- ciphertexts


def _ints_of(data: Tensor, width: int) -> list[int]:
    raw = data.contiguous().numpy().tobytes()
    return [int.from_bytes(raw[i : i + width], "little") for i in range(0, len(raw), width)]


def _tensor_of(values: Sequence[Any], width: int) -> Tensor:
    raw = b"".join(int(v).to_bytes(width, "little") for v in values)
    array = np.frombuffer(raw, dtype=np.uint8).reshape(len(values), width)
    return torch.from_numpy(array.copy())


class Ciphertext:
    """Encrypted values of one tensor, as a ``uint8`` tensor of ciphertext integers.

    ``a + b`` adds the plaintexts (multiplies the ciphertexts modulo ``n**2``);
    :attr:`summands` counts the updates a sum holds, for the mean.

    Parameters
    ----------
    data:
        ``uint8 [count, public_key.ciphertext_bytes]``, little-endian integers.
    public_key:
        The key the values were encrypted with.
    shape:
        Shape of the plaintext tensor.
    summands:
        How many encrypted updates this is the sum of.
    """

    def __init__(
        self, data: Tensor, public_key: PublicKey, shape: Sequence[int] | int, summands: int = 1
    ) -> None:
        self.public_key = _as_public(public_key)
        self.shape = tuple([shape] if isinstance(shape, int) else (int(s) for s in shape))
        if any(s < 0 for s in self.shape):
            raise ProtocolError(f"ciphertext shape {list(self.shape)} has a negative size")
        self.numel = math.prod(self.shape)
        count = -(-self.numel // self.public_key.slots)
        width = self.public_key.ciphertext_bytes
        if data.dtype != torch.uint8 or tuple(data.shape) != (count, width):
            raise ProtocolError(
                f"ciphertexts of {self.numel} values must be uint8 [{count}, {width}] for key "
                f"{self.public_key.fingerprint}, got {str(data.dtype).replace('torch.', '')} "
                f"{list(data.shape)}"
            )
        if (
            isinstance(summands, bool)
            or not isinstance(summands, int)
            or not 1 <= summands <= self.public_key.max_summands
        ):
            raise ProtocolError(
                f"a ciphertext sums 1..{self.public_key.max_summands} updates, got {summands!r}"
            )
        self.data = data
        self.summands = summands
        self._ints: list[Any] | None = None

    @property
    def ints(self) -> list[Any]:
        """The ciphertext integers (checked to lie in ``[1, n**2)``)."""
        if self._ints is None:
            values = _ints_of(self.data, self.public_key.ciphertext_bytes)
            nsquare = self.public_key.nsquare
            if any(not 0 < v < nsquare for v in values):
                raise ProtocolError(
                    "a ciphertext is not below n**2 of its key: wrong key or corrupt data"
                )
            self._ints = [_mpz(v) for v in values]
        return self._ints

    @classmethod
    def from_wire(cls, data: Tensor, marker: Tensor, public_key: PublicKey) -> Ciphertext:
        """Rebuild from the two tensors of an encrypted field (see the module docstring)."""
        if (
            marker.dtype != torch.int64
            or marker.dim() != 1
            or marker.numel() < 1
            or marker.numel() > 33
        ):
            raise ProtocolError(
                f"an encrypted field's {SUFFIX!r} tensor must be int64 [summands, *shape], "
                f"got {str(marker.dtype).replace('torch.', '')} {list(marker.shape)}"
            )
        summands, *shape = (int(v) for v in marker.tolist())
        return cls(data, public_key, shape, summands)

    def marker(self) -> Tensor:
        """The ``int64 [summands, *shape]`` tensor sent beside :attr:`data`."""
        return torch.tensor([self.summands, *self.shape], dtype=torch.int64)

    def __add__(self, other: Ciphertext) -> Ciphertext:
        if not isinstance(other, Ciphertext):
            return NotImplemented
        if other.public_key.n != self.public_key.n:
            raise ConfigError(
                f"cannot add ciphertexts of different keys ({self.public_key.fingerprint} and "
                f"{other.public_key.fingerprint})"
            )
        if other.shape != self.shape:
            raise ConfigError(
                f"cannot add ciphertexts of shapes {list(self.shape)} and {list(other.shape)}"
            )
        summands = self.summands + other.summands
        if summands > self.public_key.max_summands:
            raise ConfigError(
                f"a sum of {summands} updates overflows the key's slots (max_summands="
                f"{self.public_key.max_summands}); make keys with a larger max_summands"
            )
        nsquare = self.public_key._nsquare
        ints = [a * b % nsquare for a, b in zip(self.ints, other.ints, strict=True)]
        out = Ciphertext(
            _tensor_of(ints, self.public_key.ciphertext_bytes),
            self.public_key,
            self.shape,
            summands,
        )
        out._ints = ints
        return out

    def __radd__(self, other: Any) -> Ciphertext:
        if other == 0:  # sum(ciphertexts)
            return self
        return NotImplemented

    def __repr__(self) -> str:
        return (
            f"Ciphertext(shape={list(self.shape)}, summands={self.summands}, "
            f"ciphertexts={self.data.shape[0]}, key={self.public_key.fingerprint!r})"
        )


def _pack(public_key: PublicKey, values: Tensor) -> list[int]:
    """Fixed-point values (``int64``, in range) packed ``slots`` to a plaintext integer."""
    slot, slots = public_key.slot_bytes, public_key.slots
    flat = values.reshape(-1).numpy().astype("<u8", copy=False)
    count = -(-flat.size // slots)
    padded = np.zeros(count * slots, dtype="<u8")
    padded[: flat.size] = flat
    raw = padded.view(np.uint8).reshape(-1, 8)[:, :slot].reshape(count, slots * slot).tobytes()
    width = slots * slot
    return [int.from_bytes(raw[i : i + width], "little") for i in range(0, len(raw), width)]


def _unpack(public_key: PublicKey, plaintexts: Sequence[int], numel: int) -> Tensor:
    slot, slots = public_key.slot_bytes, public_key.slots
    raw = b"".join(int(m).to_bytes(slots * slot, "little") for m in plaintexts)
    wide = np.zeros((len(plaintexts) * slots, 8), dtype=np.uint8)
    wide[:, :slot] = np.frombuffer(raw, dtype=np.uint8).reshape(-1, slot)
    return torch.from_numpy(wide.view("<u8").reshape(-1)[:numel].astype(np.int64))


def paillier_enc(public_key: PublicKey | PrivateKey, m: Tensor) -> Ciphertext:
    """Encrypt fixed-point values (from :func:`float_to_long`); shape is kept.

    Given the :class:`PrivateKey`, the randomness is computed by the CRT
    (same ciphertext distribution, about 3x faster).
    """
    pk = _as_public(public_key)
    if m.dtype != torch.int64:
        raise ConfigError(
            f"paillier_enc takes int64 fixed-point values (float_to_long), got {m.dtype}"
        )
    values = m.detach().cpu()
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > pk.value_max):
        raise ValueError(f"fixed-point values must lie in [0, {pk.value_max}] (use float_to_long)")
    n, nsquare = pk._n, pk._nsquare
    if isinstance(public_key, PrivateKey):
        noise: Callable[[], Any] = public_key.random_nth_residue
    else:

        def noise() -> Any:
            return _powmod(_mpz(1 + secrets.randbelow(pk.n - 1)), n, nsquare)

    ints = [(1 + _mpz(m_) * n) * noise() % nsquare for m_ in _pack(pk, values)]
    out = Ciphertext(_tensor_of(ints, pk.ciphertext_bytes), pk, tuple(values.shape))
    out._ints = ints
    return out


def paillier_dec(private_key: PrivateKey | str | os.PathLike[str], c: Ciphertext) -> Tensor:
    """The plaintext sums of ``c`` as ``int64`` fixed-point values of ``c.shape``."""
    key = _as_private(private_key)
    if key.n != c.public_key.n:
        raise ConfigError(
            f"ciphertext of key {c.public_key.fingerprint} cannot be decrypted with key {key.fingerprint}"
        )
    sums = _unpack(key.public_key, [key.decrypt_int(v) for v in c.ints], c.numel)
    return sums.reshape(c.shape)


# -------------------------------------------------------------------- the hooks


class PaillierScheme:
    """Paillier as a :class:`~zmqfed.functional.encrypted.Scheme`: fixed point, packed, summed.

    With the private key it decrypts, and encrypts by the CRT (about 3x faster).
    """

    name = "paillier"
    suffix = SUFFIX

    def __init__(self, public_key: PublicKey, private_key: PrivateKey | None = None) -> None:
        self.public_key = public_key
        self.private_key = private_key

    @property
    def fingerprint(self) -> str:
        return self.public_key.fingerprint

    @property
    def can_decrypt(self) -> bool:
        return self.private_key is not None

    def encrypt(self, value: Tensor) -> Ciphertext:
        key = self.private_key if self.private_key is not None else self.public_key
        return paillier_enc(key, float_to_long(self.public_key, value))

    def from_wire(self, data: Tensor, marker: Tensor) -> Ciphertext:
        ct = Ciphertext.from_wire(data, marker, self.public_key)
        _ = ct.ints  # range-check every ciphertext now, not in the middle of an aggregation
        return ct

    def owns(self, value: Any) -> bool:
        if not isinstance(value, Ciphertext):
            return False
        if value.public_key.n != self.public_key.n:
            raise ConfigError(
                f"an upload was encrypted with key {value.public_key.fingerprint}, "
                f"not {self.public_key.fingerprint}"
            )
        return True

    def decrypt_mean(self, value: EncryptedValue) -> Tensor:
        assert isinstance(value, Ciphertext) and self.private_key is not None
        return long_to_float(
            self.private_key, paillier_dec(self.private_key, value), value.summands
        )


_served = ServedAggregate()


def paillier_package(
    public_key: PublicKey | str | os.PathLike[str],
    private_key: PrivateKey | str | os.PathLike[str] | None = None,
    *,
    layers: str | Iterable[str] | Callable[[str], bool] | None = None,
) -> None:
    """Encrypt what this node sends and handle what it receives (inside ``with maintainer:``).

    On a **collaborator**: uploads carry every floating-point field encrypted
    with ``public_key``; a download holding an encrypted model (a blind
    aggregator's) is decrypted with ``private_key`` to the mean of the
    updates it sums, so ``unpackage`` sees a plain model. With the private
    key, encryption uses the CRT, about 3x faster. ``layers`` (name patterns
    such as ``'fc.*'``, or a predicate on the tensor's name) limits
    encryption to those tensors; the others travel in the clear.

    On an **aggregator**: encrypted uploads are accepted (each ``param``
    becomes a placeholder of the right shape, the ciphertexts stay in
    ``f + '.paillier'`` as :class:`Ciphertext`), and the encrypted aggregate
    that :func:`paillier_aggregation` left (without a private key) is what
    the next downloads carry. ``API`` registers this by itself when its
    ``agg_func`` is :func:`paillier_aggregation`.

    Only the ``public_key`` argument existed in OpenFed. The hooks are the
    scheme-independent ones of :mod:`zmqfed.functional.encrypted`.
    """
    from zmqfed.core import current_maintainer

    maintainer = current_maintainer("paillier_package()")
    pk = _as_public(public_key)
    sk = _as_private(private_key) if private_key is not None else None
    if sk is not None and sk.n != pk.n:
        raise ConfigError(
            f"private key {sk.fingerprint} does not belong to public key {pk.fingerprint}"
        )
    register_encryption(maintainer, PaillierScheme(pk, sk), _served, layers)


# --------------------------------------------------------------- the aggregation


def paillier_aggregation(
    data_list: Sequence[Update],
    private_key: PrivateKey | str | os.PathLike[str] | None = None,
    meta_list: Any = None,
    optim_list: Any = None,
    *,
    public_key: PublicKey | str | os.PathLike[str] | None = None,
) -> ParamStates:
    """Add the encrypted uploads; decrypt the sum if ``private_key`` is given.

    With ``private_key`` (OpenFed's way): every encrypted field's sum is
    decrypted and divided by the number of updates, the plain mean is
    installed like :func:`average_aggregation` does (pseudo-gradients into
    ``optim_list``, buffers copied), and the model is served in the clear.

    With ``public_key`` only (a blind aggregator): the sums stay encrypted.
    Nothing of the model changes here; the aggregate is kept and the next
    downloads carry it (:func:`paillier_package`), for the key holders to
    decrypt. Fields sent in the clear (integer buffers) are averaged as usual.

    Returns ``{tensor: {field: mean tensor or Ciphertext sum}}``.
    """
    del meta_list
    key = _as_private(private_key) if private_key is not None else None
    if key is None and public_key is None:
        raise ConfigError(
            "paillier_aggregation needs private_key (decrypt the sum here) or public_key "
            "(keep it encrypted for the key holders)"
        )
    pk = key.public_key if key is not None else _as_public(public_key)  # type: ignore[arg-type]
    return aggregate_encrypted(
        data_list, PaillierScheme(pk, key), _served, decrypt=key is not None, optim_list=optim_list
    )


def _setup_maintainer(maintainer: Any, **agg_kwargs: Any) -> None:
    """What ``API`` calls for :func:`paillier_aggregation`: accept encrypted uploads."""
    from zmqfed.core.context import pop_maintainer, push_maintainer

    if agg_kwargs.get("private_key") is not None:
        public = _as_private(agg_kwargs["private_key"]).public_key
    elif agg_kwargs.get("public_key") is not None:
        public = _as_public(agg_kwargs["public_key"])
    else:
        return  # paillier_aggregation itself says what is missing
    push_maintainer(maintainer)
    try:
        paillier_package(public)
    finally:
        pop_maintainer(maintainer)


paillier_aggregation.setup_maintainer = _setup_maintainer  # type: ignore[attr-defined]
