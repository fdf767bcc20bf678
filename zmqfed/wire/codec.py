"""Per-tensor codecs: ``raw`` (zero-copy), ``lz4``, ``shuffle-lz4`` and ``auto``.

``raw`` hands libzmq a uint8 view of the tensor's own memory and, on the
receiving side, wraps the frame in a tensor without copying.  The lz4 codecs
use the *block* format without a stored size: the decompressed size always
comes from the (already validated) header, never from the stream, so a forged
stream cannot make the receiver allocate more than the header announced
(256 MiB of zeros compresses to about 1 MB, docs/zeromq.md §17).

Measured on this project's machines, lz4 gains nothing on dense float weights
and runs slower than loopback, so ``auto`` probes a sample and falls back to
``raw`` unless compression clearly pays (sparse or quantized updates).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeAlias

import lz4.block
import numpy as np
import torch

from zmqfed.errors import ConfigError, ProtocolError

__all__ = [
    "AUTO_MIN_BYTES",
    "CODECS",
    "LZ4_MAX_BYTES",
    "WIRE_CODECS",
    "Buffer",
    "choose_codec",
    "decode_tensor",
    "encode_tensor",
    "tensor_bytes",
]

#: Codec names accepted by ``encode_tensor``; ``auto`` resolves to one of the others.
CODECS = ("raw", "lz4", "shuffle-lz4", "auto")
#: Codec names that may appear in a header (``auto`` never goes on the wire).
WIRE_CODECS = ("raw", "lz4", "shuffle-lz4")
#: ``auto`` never compresses tensors smaller than this: the frame is tiny anyway.
AUTO_MIN_BYTES = 4096
#: LZ4_MAX_INPUT_SIZE: the block format cannot describe larger inputs, so bigger
#: tensors always go ``raw`` (and a header claiming more is refused).
LZ4_MAX_BYTES = 0x7E000000

# auto probes a few windows spread over the tensor (a head-only sample misjudges
# tensors whose first rows are special, e.g. embeddings with a padding row).
_PROBE_WINDOW = 64 * 1024  # a multiple of every itemsize, so windows hold whole elements
_PROBE_WINDOWS = 4
# Thresholds (docs/zeromq.md §17): lz4 must save 25 % to be worth its CPU time
# against a fast link; shuffle-lz4 (0.83 on bf16, 0.92 on fp32) must save 15 %.
_LZ4_RATIO = 0.75
_SHUFFLE_RATIO = 0.85

#: What ``encode_tensor`` returns: an object exporting the buffer protocol (bytes
#: or a uint8 numpy array).  Typed ``Any`` because ``typing_extensions.Buffer``
#: (what pyzmq's ``send_multipart`` expects) does not match numpy's stubs before 3.12.
Buffer: TypeAlias = Any


def tensor_bytes(t: torch.Tensor) -> np.ndarray[Any, Any]:
    """Return a flat uint8 numpy array over the tensor's bytes.

    The array is a view of ``t``'s memory when ``t`` is a contiguous CPU tensor
    (no copy); otherwise it views a contiguous CPU copy.

    Parameters
    ----------
    t : torch.Tensor
        A strided (dense) tensor of any dtype, including bfloat16, bool and 0-d.

    Returns
    -------
    numpy.ndarray
        1-d uint8 array of ``t.numel() * t.element_size()`` bytes.

    Raises
    ------
    ConfigError
        If ``t`` is not a dense tensor or its data cannot be read (meta device).
    """
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"expected a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided:
        raise ConfigError(f"only dense tensors can be sent, got layout {t.layout}")
    try:
        # resolve_conj/neg: a lazily conjugated view cannot be reinterpreted as bytes
        flat = t.detach().resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
        return flat.view(torch.uint8).numpy()
    except (RuntimeError, NotImplementedError, TypeError) as exc:
        raise ConfigError(f"cannot read the bytes of a {t.dtype} tensor: {exc}") from exc


def _shuffle(u8: np.ndarray[Any, Any], itemsize: int) -> np.ndarray[Any, Any]:
    """Byte planes: all first bytes of every element, then all second bytes, ..."""
    if itemsize == 1:
        return u8
    # .T.copy() is C-contiguous in the transposed order, which is what lz4 needs
    return u8.reshape(-1, itemsize).T.copy()


def _compress(u8: np.ndarray[Any, Any], codec: str, itemsize: int) -> bytes:
    data = _shuffle(u8, itemsize) if codec == "shuffle-lz4" else u8
    compressed: bytes = lz4.block.compress(data, store_size=False)
    return compressed


def _probe_sample(u8: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    n = u8.nbytes
    if n <= _PROBE_WINDOW * _PROBE_WINDOWS:
        return u8
    step = (n - _PROBE_WINDOW) // (_PROBE_WINDOWS - 1)
    # window starts are multiples of 64 KiB, hence of any itemsize
    starts = [(i * step) // _PROBE_WINDOW * _PROBE_WINDOW for i in range(_PROBE_WINDOWS)]
    return np.concatenate([u8[s : s + _PROBE_WINDOW] for s in starts])


def choose_codec(u8: np.ndarray[Any, Any], itemsize: int) -> str:
    """Pick the codec ``auto`` would use for these bytes.

    Parameters
    ----------
    u8 : numpy.ndarray
        The tensor's bytes (see :func:`tensor_bytes`).
    itemsize : int
        Bytes per element, for the byte-plane shuffle.

    Returns
    -------
    str
        ``'raw'`` below 4 KiB or when a probe of up to 256 KiB compresses
        poorly; ``'shuffle-lz4'`` if its probe ratio is < 0.85 and better than
        plain lz4's; ``'lz4'`` if its probe ratio is < 0.75.
    """
    n = u8.nbytes
    if n < AUTO_MIN_BYTES or n > LZ4_MAX_BYTES:
        return "raw"
    sample = _probe_sample(u8)
    r_lz4 = len(_compress(sample, "lz4", itemsize)) / sample.nbytes
    r_shuffle = math.inf
    if itemsize > 1:
        r_shuffle = len(_compress(sample, "shuffle-lz4", itemsize)) / sample.nbytes
    if r_shuffle < _threshold("shuffle-lz4") and r_shuffle < r_lz4:
        return "shuffle-lz4"
    if r_lz4 < _threshold("lz4"):
        return "lz4"
    return "raw"


def encode_tensor(t: torch.Tensor, codec: str) -> tuple[str, Buffer]:
    """Encode one tensor's bytes for a frame.

    Parameters
    ----------
    t : torch.Tensor
        Any dense tensor; it is detached and moved to CPU (a copy only if it is
        not already a contiguous CPU tensor).
    codec : str
        One of :data:`CODECS`.

    Returns
    -------
    codec : str
        The codec actually used, one of :data:`WIRE_CODECS`.  Empty tensors and
        tensors above :data:`LZ4_MAX_BYTES` are always ``'raw'``; ``auto`` also
        falls back to ``'raw'`` when the whole tensor compresses worse than
        the probe's threshold.
    buffer : Buffer
        For ``'raw'`` a uint8 numpy array *viewing the tensor's memory*: do not
        mutate the tensor until the frame has been sent.  Otherwise ``bytes``.

    Raises
    ------
    ConfigError
        If the codec is unknown or the tensor cannot be read.
    """
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; expected one of {CODECS}")
    u8 = tensor_bytes(t)
    n = u8.nbytes
    if codec == "raw" or n == 0 or n > LZ4_MAX_BYTES:
        return "raw", u8
    itemsize = t.element_size()
    if codec != "auto":
        return codec, _compress(u8, codec, itemsize)
    chosen = choose_codec(u8, itemsize)
    if chosen == "raw":
        return "raw", u8
    data = _compress(u8, chosen, itemsize)
    # The probe may misjudge the whole tensor; hold the result to the same bar,
    # since raw also saves the receiver a decompression and a copy.
    if len(data) >= _threshold(chosen) * n:
        return "raw", u8
    return chosen, data


def _threshold(codec: str) -> float:
    return _SHUFFLE_RATIO if codec == "shuffle-lz4" else _LZ4_RATIO


def _byte_view(buf: Any) -> memoryview:
    """A flat unsigned-byte memoryview of a frame (pyzmq Frame, bytes, array...)."""
    inner = getattr(buf, "buffer", None)  # zmq.Frame, without importing zmq
    view = memoryview(inner if inner is not None else buf)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def decode_tensor(
    buf: Any,
    *,
    dtype: torch.dtype,
    shape: Sequence[int],
    codec: str,
    raw_nbytes: int,
    name: str = "tensor",
) -> torch.Tensor:
    """Turn one frame back into a tensor.

    Parameters
    ----------
    buf : buffer
        The frame: bytes, bytearray, memoryview, numpy array, or an object with
        a ``.buffer`` attribute (a pyzmq ``Frame``).
    dtype : torch.dtype
        Element type.
    shape : sequence of int
        Tensor shape; ``prod(shape) * itemsize`` must equal ``raw_nbytes``.
    codec : str
        One of :data:`WIRE_CODECS`.
    raw_nbytes : int
        The decoded byte length, taken from the validated header.  It caps the
        decompressor's output allocation.
    name : str
        How error messages refer to this tensor.

    Returns
    -------
    torch.Tensor
        For ``raw`` frames with a writable buffer, a tensor that *shares memory*
        with the frame (no copy).  Read-only buffers are copied once.

    Raises
    ------
    ProtocolError
        If the frame does not decode to exactly ``raw_nbytes`` bytes, the codec
        is unknown, or a bool tensor holds bytes other than 0 and 1.
    """
    shape = tuple(shape)
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise ProtocolError(f"{name}: shape {list(shape)} must hold non-negative ints")
    try:
        return _decode_tensor(buf, dtype, shape, codec, raw_nbytes, name)
    except ProtocolError:
        raise
    except Exception as exc:  # e.g. torch refusing a shape; never let it escape raw
        raise ProtocolError(f"{name}: cannot decode ({type(exc).__name__}: {exc})") from exc


def _decode_tensor(
    buf: Any, dtype: torch.dtype, shape: tuple[int, ...], codec: str, raw_nbytes: int, name: str
) -> torch.Tensor:
    need = math.prod(shape) * dtype.itemsize
    if need != raw_nbytes:
        raise ProtocolError(
            f"{name}: shape {list(shape)} {dtype} needs {need} bytes, header says {raw_nbytes}"
        )
    view = _byte_view(buf)
    if codec == "raw":
        if view.nbytes != raw_nbytes:
            raise ProtocolError(f"{name}: raw frame has {view.nbytes} bytes, expected {raw_nbytes}")
        if raw_nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        if view.readonly:
            # torch warns on (and would let us write into) read-only memory
            view = memoryview(bytearray(view))
        t = torch.frombuffer(view, dtype=dtype)
    elif codec in ("lz4", "shuffle-lz4"):
        t = _decompress(view, dtype, codec, raw_nbytes, name)
    else:
        raise ProtocolError(f"{name}: unknown codec {codec!r}; expected one of {WIRE_CODECS}")
    if dtype == torch.bool and t.numel() and int(t.view(torch.uint8).max()) > 1:
        # any other byte is not a valid bool and makes torch's results undefined
        raise ProtocolError(f"{name}: bool tensor holds bytes other than 0 and 1")
    return t.reshape(shape)


def _decompress(
    view: memoryview, dtype: torch.dtype, codec: str, raw_nbytes: int, name: str
) -> torch.Tensor:
    if not 0 < raw_nbytes <= LZ4_MAX_BYTES:
        raise ProtocolError(
            f"{name}: {codec} frame cannot hold {raw_nbytes} bytes (1..{LZ4_MAX_BYTES})"
        )
    try:
        # the allocation is bounded by raw_nbytes, which the caller validated
        data = lz4.block.decompress(view, uncompressed_size=raw_nbytes, return_bytearray=True)
    except Exception as exc:  # LZ4BlockError, ValueError, MemoryError...
        raise ProtocolError(f"{name}: corrupt {codec} frame ({exc})") from exc
    if len(data) != raw_nbytes:
        # python-lz4 returns short output when the stream ends early: a lie, not data
        raise ProtocolError(
            f"{name}: {codec} frame decompressed to {len(data)} bytes, header says {raw_nbytes}"
        )
    itemsize = dtype.itemsize
    if codec == "lz4" or itemsize == 1:
        return torch.frombuffer(data, dtype=dtype)
    planes = np.frombuffer(data, dtype=np.uint8).reshape(itemsize, -1)
    out = torch.empty(raw_nbytes, dtype=torch.uint8)
    out.numpy().reshape(-1, itemsize)[...] = planes.T
    return out.view(dtype)
