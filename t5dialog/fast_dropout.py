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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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


def _register():
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(ATTENTION, t5_attention)
    AttentionMaskInterface.register(ATTENTION, eager_mask)


def install(model: nn.Module, device: torch.device) -> int:
    """Use fast dropout in ``model`` when it trains on CPU; returns how many dropouts changed.

    Every ``nn.Dropout`` becomes a ``FastDropout``; a T5 model also gets the
    attention above (the attention-probability dropout is the costly one).
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
        _register()
        model.set_attn_implementation(ATTENTION)
        changed += sum(1 for m in model.modules() if type(m).__name__ == "T5Attention")
    return changed
