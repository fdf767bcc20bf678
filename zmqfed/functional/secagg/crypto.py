"""The cryptographic pieces of secure aggregation, on the ``cryptography`` package.

* **Key agreement**: X25519 (:func:`agree`), with per-round ephemeral key
  pairs or the nodes' long-term CurveZMQ keys (Curve25519, z85-encoded in
  the keys directory: :func:`curve_key_pair`, :func:`curve_public_key`);
  HKDF-SHA256 (:func:`derive`) turns one shared secret into independent
  keys for encryption and for masks.
* **Authenticated encryption**: ChaCha20-Poly1305 (:func:`seal`,
  :func:`unseal`) for the share bundles the aggregator relays.
* **Masks**: a ChaCha20 key stream expanded to ring elements
  (:func:`mask_stream`), the same vector for the same seed everywhere.
* **Shamir secret sharing** over the prime field of ``2**521 - 1``
  (:func:`split_secret`, :func:`combine_shares`), for 32-byte seeds.

Nothing here knows about rounds or sockets; docs/privacy.md describes how
the protocol uses them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, Sequence

import torch

from zmqfed.errors import ConfigError, SecurityError

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import (
        X25519PrivateKey,
        X25519PublicKey,
    )
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    _MISSING: str | None = None
except ImportError as exc:  # pragma: no cover - the test extra installs it
    _MISSING = str(exc)

__all__ = [
    "KEY_BYTES",
    "MASK_PIECE",
    "PRIME",
    "SHARE_BYTES",
    "KeyPair",
    "add_masks",
    "agree",
    "check_public",
    "combine_shares",
    "curve_key_pair",
    "curve_public_key",
    "derive",
    "mask_stream",
    "require",
    "seal",
    "split_secret",
    "unseal",
]

#: Bytes of a key, a seed or a shared secret.
KEY_BYTES = 32
#: The Shamir field: the Mersenne prime 2**521 - 1, above every 32-byte secret.
PRIME = 2**521 - 1
#: Bytes of one share (a field element, big-endian).
SHARE_BYTES = 66
_NONCE_BYTES = 12


def require() -> None:
    """Raise ``ConfigError`` naming the extra to install when ``cryptography`` is missing."""
    if _MISSING is not None:
        raise ConfigError(
            f"secure aggregation needs the 'cryptography' package ({_MISSING}): "
            "pip install 'zmqfed[secagg]'"
        )


class KeyPair:
    """An X25519 key pair: ``private`` stays on the node, ``public`` (32 bytes) travels."""

    def __init__(self, private: X25519PrivateKey) -> None:
        self.private = private
        self.public = private.public_key().public_bytes_raw()

    @classmethod
    def generate(cls) -> KeyPair:
        """A fresh (ephemeral) key pair."""
        return cls(X25519PrivateKey.generate())


def _z85_key(key: bytes | str, what: str) -> bytes:
    from zmq.utils import z85

    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) == 40:
        raw = z85.decode(raw)
    if len(raw) != KEY_BYTES:
        raise SecurityError(f"{what} is not a Curve25519 key (z85, 40 characters)")
    return raw


def curve_key_pair(secret_z85: bytes | str) -> KeyPair:
    """The X25519 key pair of a CurveZMQ secret key (Curve25519 scalars are X25519 keys)."""
    return KeyPair(X25519PrivateKey.from_private_bytes(_z85_key(secret_z85, "the secret key")))


def curve_public_key(public_z85: bytes | str) -> bytes:
    """The 32 raw bytes of a CurveZMQ public key."""
    return _z85_key(public_z85, "the public key")


def agree(own: KeyPair, peer_public: bytes) -> bytes:
    """The X25519 shared secret of ``own`` and a peer's public key (32 bytes).

    Raises ``SecurityError`` for a malformed key or one that yields the
    all-zero secret (a low-order point).
    """
    if not isinstance(peer_public, bytes) or len(peer_public) != KEY_BYTES:
        raise SecurityError(f"a public key has {KEY_BYTES} bytes")
    try:
        return own.private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as exc:  # cryptography refuses the all-zero shared secret
        raise SecurityError(f"refused a public key: {exc}") from exc


def check_public(public: bytes) -> None:
    """``SecurityError`` unless ``public`` is an X25519 key that yields a non-zero secret."""
    agree(KeyPair.generate(), public)


def derive(secret: bytes, label: str, context: bytes) -> bytes:
    """HKDF-SHA256: a 32-byte key for ``label`` (what it is for) in ``context`` (round, pair)."""
    hkdf = HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=label.encode() + context
    )
    return hkdf.derive(secret)


def seal(key: bytes, plaintext: bytes, associated: bytes) -> bytes:
    """ChaCha20-Poly1305: a random nonce, then the ciphertext and its tag."""
    nonce = os.urandom(_NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, associated)


def unseal(key: bytes, sealed: bytes, associated: bytes) -> bytes:
    """Open :func:`seal`'s output; ``SecurityError`` if it was altered or is not for ``associated``."""
    if len(sealed) < _NONCE_BYTES + 16:
        raise SecurityError("a sealed message is too short")
    try:
        return ChaCha20Poly1305(key).decrypt(
            sealed[:_NONCE_BYTES], sealed[_NONCE_BYTES:], associated
        )
    except InvalidTag:
        raise SecurityError("a sealed message failed authentication") from None


def _key_stream(seed: bytes, count: int, word: int, start: int) -> bytearray:
    """``count`` words of ``word`` bytes of ChaCha20(seed) from word ``start`` (block aligned)."""
    if len(seed) != KEY_BYTES:
        raise ConfigError(f"a mask seed has {KEY_BYTES} bytes")
    if (start * word) % 64:
        raise ConfigError(f"a mask piece must start on a 64-byte block, not at word {start}")
    counter = (start * word // 64).to_bytes(4, "little")  # the first 4 nonce bytes count blocks
    encryptor = Cipher(algorithms.ChaCha20(seed, counter + bytes(12)), mode=None).encryptor()
    return bytearray(encryptor.update(bytes(count * word)))


def mask_stream(seed: bytes, count: int, modulus_bits: int, start: int = 0) -> torch.Tensor:
    """Ring elements ``start .. start + count`` of the mask of ``seed`` (int64).

    ChaCha20 with the 32-byte ``seed`` as key and a zero nonce (every seed
    is used for one mask only) encrypts zeros; the key stream is read as
    little-endian 32-bit words for rings up to ``2**32``, 64-bit words above,
    and reduced modulo the ring, a power of two: every element is uniform.
    ``start`` must fall on a 64-byte block (a multiple of 16 or 8 words): the
    stream's block counter is set to it, so a mask can be made in pieces.
    """
    word = 8 if modulus_bits > 32 else 4
    stream = _key_stream(seed, max(count, 0), word, start)
    if count <= 0:
        return torch.zeros(0, dtype=torch.int64)
    if word == 8:
        words = torch.frombuffer(stream, dtype=torch.int64)
    else:
        words = torch.frombuffer(stream, dtype=torch.int32).to(torch.int64)
    return words.bitwise_and_((1 << modulus_bits) - 1)


#: Ring elements masked per piece (8 MiB of int64): bounds the memory masking takes.
MASK_PIECE = 2**20


def add_masks(
    vector: torch.Tensor, masks: Sequence[tuple[bytes, int]], modulus_bits: int
) -> torch.Tensor:
    """``vector += sign * mask(seed)`` for every ``(seed, sign)``, modulo ``2**modulus_bits``.

    In place on an int64 ``vector`` of ring elements, a piece at a time, so
    the extra memory is a few pieces whatever the model's size.
    """
    ring = (1 << modulus_bits) - 1
    n = vector.numel()
    for start in range(0, n, MASK_PIECE):
        piece = vector[start : start + MASK_PIECE]
        for seed, sign in masks:
            if modulus_bits > 32:
                mask = mask_stream(seed, piece.numel(), modulus_bits, start)
                (piece.add_(mask) if sign > 0 else piece.sub_(mask)).bitwise_and_(ring)
                continue
            # 32-bit words, signed: congruent to the unsigned ones modulo 2**32; at most
            # MAX_NEIGHBOURS + 1 of them cannot overflow int64 before the one reduction below
            words = torch.frombuffer(_key_stream(seed, piece.numel(), 4, start), dtype=torch.int32)
            piece.add_(words) if sign > 0 else piece.sub_(words)
        piece.bitwise_and_(ring)
    return vector


def split_secret(secret: bytes, xs: Sequence[int], threshold: int) -> list[bytes]:
    """Shamir: shares of ``secret`` at the points ``xs`` (distinct, in ``[1, 2**16)``).

    Any ``threshold`` of them rebuild the secret (:func:`combine_shares`);
    fewer reveal nothing about it.
    """
    if not 1 <= threshold <= len(xs):
        raise ConfigError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < 2**16 for x in xs):
        raise ConfigError("share points must be distinct ints in [1, 65535]")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in xs:
        y = 0
        for c in reversed(coefficients):  # Horner
            y = (y * x + c) % PRIME
        shares.append(y.to_bytes(SHARE_BYTES, "big"))
    return shares


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    """The value at ``at`` of the polynomial through ``points`` (Lagrange, mod PRIME)."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num = den = 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine_shares(shares: Mapping[int, bytes], threshold: int, size: int = KEY_BYTES) -> bytes:
    """Rebuild a ``size``-byte secret from at least ``threshold`` shares ``{x: share}``.

    Shares beyond the threshold are checked against the polynomial the
    first ones define. Raises ``SecurityError`` with too few shares, a
    malformed one, or shares that do not lie on one polynomial (a forged or
    corrupted share).
    """
    if len(shares) < threshold:
        raise SecurityError(f"{len(shares)} shares, {threshold} needed to rebuild a secret")
    points = []
    for x, share in sorted(shares.items()):
        if len(share) != SHARE_BYTES:
            raise SecurityError(f"a share has {len(share)} bytes, expected {SHARE_BYTES}")
        y = int.from_bytes(share, "big")
        if y >= PRIME:
            raise SecurityError("a share lies outside the field")
        points.append((x, y))
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate(base, x) != y:
            raise SecurityError("shares disagree: at least one was forged or corrupted")
    value = _interpolate(base, 0)
    if value >> (8 * size):
        raise SecurityError("shares rebuild no valid secret: forged or from other secrets")
    return value.to_bytes(size, "big")
