"""Opt-in lossy compression of the exchanged tensors, as package/unpackage hooks.

Call the same function inside ``with maintainer:`` on the aggregator and on
every collaborator::

    with maintainer:
        stats = zmqfed.functional.int8_quantization()

=========================  ==========  ============================================
function                   directions  tensor bytes sent (float32 model)
=========================  ==========  ============================================
``half_precision()``       both        1/2: float16 or bfloat16
``int8_quantization()``    both        ~1/4: int8 plus a float32 scale
``topk_sparsification()``  upload      ~2 x fraction: the k largest entries of the
                                       update minus the downloaded model, plus
                                       their int32 indices
=========================  ==========  ============================================

Common rules:

* Only floating-point fields of floating-point tensors are compressed:
  integer buffers (BatchNorm's ``num_batches_tracked``) and every field not
  named in ``fields`` (optimizer state by default) travel unchanged.
* The sender's encoder runs after every other package hook (nice 200, after
  ``device_alignment``'s 100); the receiver's decoder runs before every other
  unpackage hook (nice -100), so other hooks only ever see dense tensors of
  the local dtype.
* A node always decodes what it receives in the compressed format; the
  ``upload``/``download`` flags only choose what it sends compressed. A node
  may compress each direction with one compressor only (``ConfigError``
  otherwise), e.g. ``half_precision(upload=False)`` with
  ``topk_sparsification()``.
* int8 and top-k send tensors too small to pay for their extra header
  entries (about 128 bytes each) as they are.
* Each function returns a :class:`CompressionStats` of this node's tensor
  bytes before and after its hooks. An aggregator encodes the served model
  once per version, whatever the number of downloads;
  ``maintainer.stats`` counts the bytes of every message.

Received compressed data is validated (dtypes, shapes, index ranges) before
it is used: a malformed upload is refused with ``bad-upload``, a malformed
download raises ``ProtocolError``.
"""

from __future__ import annotations

from zmqfed.functional.compress.common import CompressionStats
from zmqfed.functional.compress.half import half_precision
from zmqfed.functional.compress.int8 import int8_quantization
from zmqfed.functional.compress.topk import topk_sparsification

__all__ = ["CompressionStats", "half_precision", "int8_quantization", "topk_sparsification"]
