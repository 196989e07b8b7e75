"""Dropout with cheap random masks: the biggest single speed-up of CPU training.

Why this exists: on CPU, PyTorch draws each element of a dropout mask with its
own call to its Mersenne Twister (``bernoulli_``). Profiling a training step of
the small T5 (``bench/bench_train.py``) put ``bernoulli_`` at about 20% of the
step, more than all the other element-wise work together; most of it is the
dropout on the attention probabilities (batch x heads x length x length).

Here one 64-bit draw from the same torch generator gives the masks of four
elements (16 bits each). An element is dropped when its 16 bits fall below
``k = round(p * 65536)``, so the drop rate is ``p`` rounded to 1/65536
(0.1 -> 0.1000061), and kept elements are scaled by 65536 / (65536 - k), the
exact inverse keep rate. The model is unchanged: the same dropout rate at the
same places, inverted scaling, nothing in eval mode. Only the random stream differs, and it
comes from ``torch``'s own generator, so ``torch.manual_seed`` and the RNG state
saved in checkpoints still make runs reproducible and resumable bit for bit.

Only for CPU: CUDA's dropout is already fast (a counter-based generator inside
fused kernels), so ``install`` leaves models on a GPU alone.

The attention is a copy of transformers' eager T5 attention, registered
through its attention registry. `missing_internals` checks, before it is
registered, that this transformers still has what the copy relies on; where
it does not, the attention keeps torch's dropout (a note says so, once) and
only the other dropouts are replaced.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F
from torch import nn

from t5dialog.files import first_line

ATTENTION = "t5_fast_dropout"  # the attention implementation name registered with transformers


def keep_mask(shape, k: int, device=None) -> torch.Tensor:
    """Boolean mask, False (dropped) with probability k / 65536."""
    n = torch.Size(shape).numel()
    # randint over the full int64 range: all 64 bits random, four int16 lanes per draw.
    bits = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device).view(torch.int16)[:n]
    return (bits >= -32768 + k).view(shape)


def apply_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """Inverted dropout of ``x`` at rate p rounded to 1/65536 (training only: callers skip it in eval)."""
    k = min(round(p * 65536), 65536)  # dropped out of every 65536
    if k <= 0:
        return x
    if k == 65536:
        return x * 0.0
    # Scale by the exact keep rate, so that the expected output is exactly x.
    return x * (keep_mask(x.shape, k, x.device).to(x.dtype) * (65536 / (65536 - k)))


class FastDropout(nn.Dropout):
    """A drop-in ``nn.Dropout`` (same ``p``, same train/eval switch) using ``apply_dropout``."""

    def forward(self, x):
        return apply_dropout(x, self.p) if self.training else x


def t5_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_bias=None, **kwargs):
    """transformers' eager T5 attention, with the fast dropout on the probabilities.

    T5 adds its relative position bias to unscaled scores; ``attention_mask``
    is the additive float mask (``eager_mask``) that transformers builds for
    this implementation name.
    """
    scores = torch.matmul(query, key.transpose(2, 3))
    if scaling is not None and scaling != 1.0:
        scores = scores * scaling
    if position_bias is not None:
        scores = scores + position_bias
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = F.softmax(scores, dim=-1)
    if module.training and dropout > 0:
        weights = apply_dropout(weights, dropout)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


# How T5Attention.forward calls its eager attention, and so how it calls the one registered in its place.
EAGER_PARAMETERS = ("module", "query", "key", "value", "attention_mask", "scaling", "dropout", "position_bias")


def t5_attentions(model: nn.Module) -> list[nn.Module]:
    """The T5Attention modules of ``model``; none where transformers has no such class any more."""
    try:
        from transformers.models.t5.modeling_t5 import T5Attention
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, T5Attention)]


def missing_internals(model: nn.Module) -> str | None:
    """Why `t5_attention` cannot stand in for the attention of ``model`` (a T5) in this transformers; None if it can.

    It needs the attention registry (AttentionInterface, AttentionMaskInterface,
    eager_mask), an attention whose forward looks its function up there
    (ALL_ATTENTION_FUNCTIONS), and that forward's eager function to take the
    same arguments and compute what the copy computes. A transformers that
    moved or changed any of it gets torch's dropout rather than a traceback.
    """
    try:
        from transformers import AttentionInterface  # noqa: F401 (imported to see that it is there)
        from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: F401
    except ImportError as e:
        return f"this transformers has no {e.name or first_line(e)}"
    kinds = {type(m) for m in t5_attentions(model)}
    if not kinds:
        return "the model has no T5Attention"
    for kind in kinds:
        forward = inspect.unwrap(kind.forward)
        if "ALL_ATTENTION_FUNCTIONS" not in forward.__code__.co_names:
            return f"{kind.__qualname__}.forward does not look its attention up in transformers' registry"
        eager = forward.__globals__.get("eager_attention_forward")
        if eager is None:
            return f"{kind.__qualname__}'s module has no eager_attention_forward"
        parameters = tuple(inspect.signature(eager).parameters)
        if parameters[:len(EAGER_PARAMETERS)] != EAGER_PARAMETERS:
            return f"its eager_attention_forward takes {', '.join(parameters)}"
        if not computes_like(eager):
            return "its eager_attention_forward computes something else than this copy of it"
    return None


def computes_like(eager) -> bool:
    """Does ``eager`` give what `t5_attention` gives, on a small input without dropout?"""
    draw = torch.Generator().manual_seed(0)  # its own generator: the run's random stream is left as it was
    query, key, value = (torch.randn(2, 2, 3, 4, generator=draw) for _ in range(3))
    bias, mask = torch.randn(1, 2, 3, 3, generator=draw), torch.zeros(2, 1, 3, 3)
    mask[0, ..., -1] = torch.finfo(torch.float32).min  # one padded key
    module = nn.Module().eval()
    with torch.no_grad():
        theirs = eager(module, query, key, value, mask, scaling=1.0, dropout=0.0, position_bias=bias)[0]
        ours = t5_attention(module, query, key, value, mask, scaling=1.0, dropout=0.0, position_bias=bias)[0]
    return theirs.shape == ours.shape and torch.allclose(theirs, ours, atol=1e-6)


@functools.cache  # once per process and reason: every model installed after it meets the same transformers
def note_fallback(reason: str) -> None:
    print(f"note: fast dropout leaves the attention's dropout to torch ({reason}); "
          "training is the same, only slower on CPU", flush=True)


def register_attention(model: nn.Module) -> str | None:
    """Register `t5_attention` and make it ``model``'s; why not (and nothing changed) if this transformers lacks what it needs."""
    try:
        reason = missing_internals(model)
    except Exception as e:  # the check itself tripped over a changed transformers: a difference too
        reason = f"checking it failed: {first_line(e)}"
    if reason is None:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask

        try:
            AttentionInterface.register(ATTENTION, t5_attention)
            AttentionMaskInterface.register(ATTENTION, eager_mask)
            model.set_attn_implementation(ATTENTION)
        except (TypeError, ValueError, AttributeError) as e:  # a registry that takes or checks names otherwise
            reason = f"registering it failed: {first_line(e)}"
    return reason


def install(model: nn.Module, device: torch.device) -> int:
    """Use fast dropout in ``model`` when it trains on CPU; returns how many dropouts changed.

    Every ``nn.Dropout`` becomes a ``FastDropout``; a T5 model also gets the
    attention above (the attention-probability dropout is the costly one)
    where this transformers has what it relies on (`missing_internals`).
    Weights, config file and checkpoints are unaffected: the attention
    implementation is not saved, so a loaded checkpoint uses the default.
    """
    if device.type != "cpu":
        return 0
    changed = 0
    for parent in model.modules():
        for name, child in parent.named_children():
            if type(child) is nn.Dropout:
                fast = FastDropout(child.p)
                fast.train(child.training)  # a new module starts in training mode
                setattr(parent, name, fast)
                changed += 1
    if getattr(model.config, "model_type", None) == "t5":
        reason = register_attention(model)
        if reason:
            note_fallback(reason)
        else:
            changed += len(t5_attentions(model))
    return changed
