"""Federated LoRA fine-tuning of a small causal LM on Python's own source code.

::

    zmqfed-sim --star 4 --app examples.llm_lora.app:factory --rounds 8

Each collaborator holds the source files of other top-level packages of the
standard library (``asyncio``, ``email``, ``json``, ... dealt out in turn):
naturally non-IID text that ships with Python, nothing is downloaded. The
model is a small LLaMA built from a config with random weights and wrapped by
``peft`` LoRA adapters on every projection (plus a trainable output head);
the base stays frozen. Collaborators exchange only the adapters
(``App(partial=True)``: ``Maintainer(..., partial=True)`` with
``zmqfed.partial.trainable_state_dict``), so a round moves a few percent of
the model. The aggregator averages the adapters (FedAvg) and reports, after
every round, the perplexity on held-out packages no collaborator trains on,
the bytes one collaborator exchanged and the size of the full model.

Options (``--set KEY=VALUE``): ``steps`` (local steps per round, 30), ``lr``
(AdamW, 3e-3), ``batch`` (8), ``seq`` (64), ``rank`` (LoRA r, 8), ``seed``
(0), ``max_kb`` (text per collaborator, 300).

Needs the ``models`` extra (``pip install zmqfed[models]``).
"""

from __future__ import annotations

import math
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Any

import torch

from zmqfed.app import App, NodeContext
from zmqfed.meta import Meta
from zmqfed.optim import FederatedOptimizer
from zmqfed.partial import trainable_state_dict
from zmqfed.props import COLLABORATOR

__all__ = ["build_model", "factory", "package_text", "perplexity"]

#: Packages dealt out to the collaborators in turn, and the held-out ones.
TRAIN_PACKAGES = (
    "asyncio",
    "email",
    "json",
    "logging",
    "unittest",
    "xml",
    "http",
    "importlib",
    "concurrent",
    "multiprocessing",
    "sqlite3",
    "collections",
)
HELD_OUT = ("urllib", "wsgiref", "html")
VOCAB = 256  # bytes: no tokenizer to download


def package_text(names: tuple[str, ...] | list[str], max_bytes: int) -> bytes:
    """The source of the standard library's packages ``names`` (sorted files), cut at ``max_bytes``."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for name in names:
        root = stdlib / name
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*.py")):
            if "test" in path.relative_to(stdlib).parts[1:-1]:
                continue
            out += path.read_bytes()
            if len(out) >= max_bytes:
                return bytes(out[:max_bytes])
    return bytes(out)


def build_model(seed: int = 0, rank: int = 8) -> Any:
    """A small LLaMA with random weights, LoRA adapters on every projection and a trainable head."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():  # deprecation notices of transformers/peft internals
        warnings.simplefilter("ignore")
        import peft
        import transformers as tf

        torch.manual_seed(seed)
        config = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=96,
            intermediate_size=256,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        )
        base = tf.LlamaForCausalLM(config)
        lora = peft.LoraConfig(
            r=rank,
            lora_alpha=2 * rank,
            lora_dropout=0.0,
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
            modules_to_save=["lm_head"],
        )
        return peft.get_peft_model(base, lora)


def _windows(data: torch.Tensor, n: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(data) - seq - 1, (n,), generator=generator)
    return torch.stack([data[s : s + seq] for s in starts.tolist()])


@torch.no_grad()
def perplexity(model: Any, data: torch.Tensor, seq: int, windows: int = 48) -> float:
    """exp(mean next-byte loss) over fixed windows of ``data``."""
    model.eval()
    batch = _windows(data, windows, seq, torch.Generator().manual_seed(1234))
    loss = model(input_ids=batch, labels=batch).loss
    return math.exp(float(loss))


def _as_tensor(text: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def factory(ctx: NodeContext) -> App:
    """Build the LoRA app for the node described by ``ctx``."""
    torch.set_num_threads(1)
    opt = dict(ctx.options)
    seed = int(opt.get("seed", 0))
    seq = int(opt.get("seq", 64))
    model = build_model(seed, rank=int(opt.get("rank", 8)))
    app = App(model=model, rounds=ctx.rounds or 8, partial=True, reduce_keys=("loss",))
    adapters = trainable_state_dict(model)
    adapter_bytes = sum(t.numel() * t.element_size() for t in adapters.values())
    full_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if ctx.aggregator and not ctx.collaborator:
        held_out = _as_tensor(package_text(list(HELD_OUT), 200_000))
        initial = perplexity(model, held_out, seq)

        def evaluate() -> dict[str, Any]:
            return {
                "perplexity": perplexity(model, held_out, seq),
                "initial_perplexity": initial,
                "adapter_MB": adapter_bytes / 1e6,
                "full_model_MB": full_bytes / 1e6,
            }

        app.evaluate = evaluate
    if ctx.collaborator:
        mine = [p for i, p in enumerate(TRAIN_PACKAGES) if i % ctx.parts == ctx.index]
        text = _as_tensor(package_text(mine, int(opt.get("max_kb", 300)) * 1000))
        steps, batch = int(opt.get("steps", 30)), int(opt.get("batch", 8))
        params = [p for p in model.parameters() if p.requires_grad]
        adamw = torch.optim.AdamW(params, lr=float(opt.get("lr", 3e-3)), weight_decay=0.0)
        local = FederatedOptimizer(adamw, COLLABORATOR)
        generator = torch.Generator().manual_seed(seed + 1000 * (ctx.index + 1))

        def train(meta: Meta) -> dict[str, Any]:
            model.train()
            total = 0.0
            for _ in range(steps):
                x = _windows(text, batch, seq, generator)
                loss = model(input_ids=x, labels=x).loss
                local.zero_grad()
                loss.backward()
                local.step()
                total += float(loss.detach())
            return {"instances": len(text), "loss": total / steps, "packages": ",".join(mine)}

        app.train = train
        app.local_optim = local
    return app
