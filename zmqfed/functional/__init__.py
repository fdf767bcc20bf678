"""Hooks, step policies and aggregation rules on top of the Maintainer.

Functions that register hooks act on the Maintainer of the enclosing
``with maintainer:`` block.
"""

from __future__ import annotations

from zmqfed.core.steps import (
    after_destroy,
    after_download,
    after_upload,
    at_failed,
    at_first,
    at_invalid_state,
    at_last,
    at_new_episode,
    at_zombie,
    before_destroy,
    before_download,
    before_upload,
)
from zmqfed.functional.aggregate import (
    StreamingFedAvg,
    average_aggregation,
    elastic_aggregation,
    krum_aggregation,
    krum_select,
    load_param_states,
    median_aggregation,
    naive_aggregation,
    trimmed_mean_aggregation,
)
from zmqfed.functional.compress import (
    CompressionStats,
    half_precision,
    int8_quantization,
    topk_sparsification,
)
from zmqfed.functional.hooks import device_alignment, sign_gradient_clip, streaming_fedavg
from zmqfed.functional.paillier import (
    Ciphertext,
    PrivateKey,
    PublicKey,
    float_to_long,
    key_gen,
    long_to_float,
    paillier_aggregation,
    paillier_dec,
    paillier_enc,
    paillier_package,
)
from zmqfed.functional.reduce import AutoReducer, meta_reduce
from zmqfed.functional.steps import (
    count_step,
    deadline_step,
    dispatch_step,
    period_step,
    version_check,
)

__all__ = [
    "AutoReducer",
    "Ciphertext",
    "CompressionStats",
    "PrivateKey",
    "PublicKey",
    "StreamingFedAvg",
    "after_destroy",
    "after_download",
    "after_upload",
    "at_failed",
    "at_first",
    "at_invalid_state",
    "at_last",
    "at_new_episode",
    "at_zombie",
    "average_aggregation",
    "before_destroy",
    "before_download",
    "before_upload",
    "count_step",
    "deadline_step",
    "device_alignment",
    "dispatch_step",
    "elastic_aggregation",
    "float_to_long",
    "half_precision",
    "int8_quantization",
    "key_gen",
    "krum_aggregation",
    "krum_select",
    "load_param_states",
    "long_to_float",
    "median_aggregation",
    "meta_reduce",
    "naive_aggregation",
    "paillier_aggregation",
    "paillier_dec",
    "paillier_enc",
    "paillier_package",
    "period_step",
    "sign_gradient_clip",
    "streaming_fedavg",
    "topk_sparsification",
    "trimmed_mean_aggregation",
    "version_check",
]
