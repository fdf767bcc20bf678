"""Real architectures for the model matrix: built from ``transformers`` configs, random weights.

Nothing is downloaded (``HF_HUB_OFFLINE=1`` is set before ``transformers``
is imported): every model is built from a config with random weights, at the
published size (``scale='full'``, for ``tools/bench``) or with the same
structure and tensor count at a few MiB (``scale='small'``, for the tests).
Needs the ``models`` extra (``pip install zmqfed[models]``).

=============  ==================================================================
``resnet50``   ``ResNetConfig(depths=[3, 4, 6, 3], layer_type="bottleneck")``: 320
               tensors with BatchNorm buffers (``num_batches_tracked`` int64)
``gpt2``       GPT-2 small: ``lm_head.weight`` tied to ``transformer.wte.weight``
``bert``       BERT-base for sequence classification
``llama-lora`` a LLaMA wrapped by ``peft`` LoRA (r=8 on q/v): collaborators
               exchange only the adapters (``partial=True``)
=============  ==================================================================
"""

from __future__ import annotations

import os
import warnings
from typing import Any

__all__ = ["MATRIX", "available", "build", "exchanged", "local_step"]

MATRIX = ("resnet50", "gpt2", "bert", "llama-lora")

_VOCAB_SMALL = 512


def available() -> bool:
    """The ``models`` extra (transformers, peft) is installed."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "peft"))


def build(name: str, scale: str = "small", seed: int = 0) -> Any:
    """The model ``name`` of :data:`MATRIX`, at ``scale`` ('small' or 'full'), from ``seed``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    if name not in MATRIX:
        raise ValueError(f"unknown model {name!r}; choose from {MATRIX}")
    if scale not in ("small", "full"):
        raise ValueError(f"scale must be 'small' or 'full', got {scale!r}")
    small = scale == "small"
    torch.manual_seed(seed)
    with warnings.catch_warnings():  # deprecation notices of transformers/peft internals
        warnings.simplefilter("ignore")
        import transformers as tf

        if name == "resnet50":
            kw: dict[str, Any] = {"depths": [3, 4, 6, 3], "layer_type": "bottleneck"}
            if small:
                kw.update(hidden_sizes=[16, 32, 64, 128], embedding_size=8, num_labels=10)
            return tf.ResNetForImageClassification(tf.ResNetConfig(**kw))
        if name == "gpt2":
            kw = {}
            if small:
                kw = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=_VOCAB_SMALL, n_positions=64)
                kw.update(bos_token_id=0, eos_token_id=0)
            return tf.GPT2LMHeadModel(tf.GPT2Config(**kw))
        if name == "bert":
            kw = {"num_labels": 2}
            if small:
                kw.update(
                    num_hidden_layers=2,
                    hidden_size=32,
                    num_attention_heads=2,
                    intermediate_size=64,
                    vocab_size=_VOCAB_SMALL,
                    max_position_embeddings=64,
                )
            return tf.BertForSequenceClassification(tf.BertConfig(**kw))
        import peft

        if small:
            kw = dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                num_key_value_heads=2,
                vocab_size=_VOCAB_SMALL,
                max_position_embeddings=64,
            )
        else:  # a 1B-class LLaMA: 16 layers of width 2048, 32k vocabulary
            kw = dict(
                hidden_size=2048,
                intermediate_size=5632,
                num_hidden_layers=16,
                num_attention_heads=32,
                num_key_value_heads=4,
                vocab_size=32000,
            )
        kw.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
        base = tf.LlamaForCausalLM(tf.LlamaConfig(**kw))
        lora = peft.LoraConfig(
            r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], lora_dropout=0.0
        )
        model = peft.get_peft_model(base, lora)
        torch.manual_seed(seed + 1)
        with torch.no_grad():  # LoRA's B starts at zero: make the adapters non-trivial
            for pname, p in model.named_parameters():
                if "lora_B" in pname:
                    p.normal_(0.0, 0.02)
        return model


def exchanged(model: Any, name: str) -> tuple[dict[str, Any], bool]:
    """What a collaborator exchanges: ``(state_dict, partial)``.

    The LoRA model's collaborators exchange only the adapters; the others the
    whole state dict (tied names included: the wire sends them once).
    """
    from zmqfed.partial import trainable_state_dict

    if name == "llama-lora":
        return trainable_state_dict(model), True
    return model.state_dict(keep_vars=True), False


def local_step(model: Any, name: str, seed: int, lr: float = 0.05) -> float:
    """One deterministic SGD step of ``model`` on a random batch from ``seed``; the loss."""
    import torch

    g = torch.Generator().manual_seed(seed)
    model.train()
    if name == "resnet50":
        x = torch.randn(2, 3, 32, 32, generator=g)
        y = torch.randint(0, model.config.num_labels, (2,), generator=g)
        out = model(pixel_values=x, labels=y)
    elif name == "bert":
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=g)
        y = torch.randint(0, 2, (2,), generator=g)
        out = model(input_ids=ids, labels=y)
    else:
        vocab = model.config.vocab_size
        ids = torch.randint(0, vocab, (2, 16), generator=g)
        out = model(input_ids=ids, labels=ids)
    loss = out.loss
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.SGD(params, lr=lr)
    optim.zero_grad()
    loss.backward()
    optim.step()
    return float(loss.detach())
