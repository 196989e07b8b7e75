"""The model: which one to start from, its loss, and how it answers.

- `load_pretrained`: a hub name or a local folder (safetensors only, no
  remote code); offline, the Hugging Face cache.
- `build_scratch`: a small T5 (`SCRATCH_CONFIG`) with a Unigram tokenizer
  trained on the training text, for machines that cannot get t5-small.
- `token_loss_sum`: the training loss, shared by training, validation and
  eval.py's perplexity.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

import fast_dropout
import hub
from cli import UserError
from dataset import SEPARATOR, read_dialogues

DEFAULT_MODEL = "t5-small"
# A T5 sized for a laptop CPU when t5-small cannot be had (about 8.5M parameters
# with an 8k vocabulary): same architecture, 4 encoder + 4 decoder layers.
MIN_SCRATCH_VOCAB = 64  # the tokenizer trainer needs room for the special tokens and the alphabet's pieces
# Generation defaults, chosen for chat: 64 new tokens rather than the library's
# 20 (which cuts replies mid-sentence), greedy decoding so answers are
# reproducible, and no repeated 3-grams, the usual cure for greedy loops.
# Checkpoints carry them in generation_config.json, so `generate` anywhere decodes the same.
GENERATION_DEFAULTS = dict(max_new_tokens=64, num_beams=1, do_sample=False, top_p=1.0, top_k=50, temperature=1.0,
                           no_repeat_ngram_size=3, repetition_penalty=1.0)
SCRATCH_CONFIG = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4, dropout_rate=0.1)


def first_line(e: BaseException, limit: int = 200) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]


# ---------------------------------------------------------------- loading


def load_pretrained(name: str):
    """Model and tokenizer from a local folder or the hub (or its cache when offline)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    local = Path(name).is_dir()
    offline = not local and not hub.hub_reachable()
    tokenizer = AutoTokenizer.from_pretrained(name, local_files_only=offline)
    model = AutoModelForSeq2SeqLM.from_pretrained(name, use_safetensors=True, local_files_only=offline)
    return model, tokenizer


def load_checkpoint(path: Path):
    """Model and tokenizer of a checkpoint folder written by train.py (or save_pretrained)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, use_safetensors=True)
    except Exception as e:  # any failure here means a broken folder, whatever the library raised
        raise UserError(f"cannot load the checkpoint in {path} ({first_line(e)}); it is damaged: "
                        "use another checkpoint or retrain") from None
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(f"{path}: its tokenizer ({len(tokenizer)} tokens) does not fit its model "
                        f"({model.config.vocab_size}); this checkpoint mixes a model and a tokenizer of different runs")
    return model, tokenizer


# ---------------------------------------------------------------- from scratch


def train_tokenizer(texts, vocab_size: int):
    """A SentencePiece-style (Unigram) T5 tokenizer trained on our own text."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import T5Tokenizer

    raw = Tokenizer(models.Unigram())
    raw.normalizer = normalizers.NFKC()
    raw.pre_tokenizer = pre_tokenizers.Metaspace()
    # T5's convention: <pad>=0 (also the decoder start), </s>=1, <unk>=2.
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>")
    raw.train_from_iterator(texts, trainer)
    vocab = [tuple(piece) for piece in json.loads(raw.to_str())["model"]["vocab"]]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_scratch(train_file, vocab_size: int, seed: int, **config_overrides):
    """A randomly initialised T5 (SCRATCH_CONFIG) and a tokenizer trained on the training text."""
    from transformers import T5Config, T5ForConditionalGeneration

    dialogues, _ = read_dialogues(train_file)
    # Train on the text as the model sees it, separator included, so that
    # __eou__ gets tokens of its own instead of <unk>.
    tokenizer = train_tokenizer([SEPARATOR.join(d) for d in dialogues], vocab_size)
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                      decoder_start_token_id=tokenizer.pad_token_id, **{**SCRATCH_CONFIG, **config_overrides})
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(config), tokenizer


def choose_model(name: str, named_by_user: bool, train_file, scratch_vocab_size: int, seed: int, log):
    """(model, tokenizer, name): --model, or scratch when the default can't be had."""
    if name == "scratch":
        return (*build_scratch(train_file, scratch_vocab_size, seed), "scratch")
    try:
        return (*load_pretrained(name), name)
    except (OSError, ValueError) as e:
        if named_by_user:  # the user named it: never swap in something else
            raise UserError(f"cannot load --model {name} ({first_line(e)}); check the name or folder, "
                            "or use --model scratch") from None
    bar = "!" * 78
    log(f"{bar}\nWARNING: the default model '{DEFAULT_MODEL}' is not available (no connection to the Hugging Face hub\n"
        f"and not in its cache). Training a SMALL T5 FROM SCRATCH instead (see SCRATCH_CONFIG in models.py).\n"
        f"Its replies will be far worse than a fine-tuned t5-small. Pass --model scratch to silence this.\n{bar}")
    return (*build_scratch(train_file, scratch_vocab_size, seed), "scratch")


# ---------------------------------------------------------------- training


def prepare_for_training(model, device, precision: str, attention: str, use_fast_dropout: bool):
    """On the device, with the attention kernel and CUDA math settings the run asked for."""
    model = model.to(device)  # weights stay fp32 whatever the precision: autocast casts per operation
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"  # --precision fp32 means strict fp32
        torch.backends.cudnn.allow_tf32 = precision != "fp32"
    attention = attention if attention != "auto" else ("sdpa" if device.type == "cuda" else "eager")
    model.set_attn_implementation(attention)
    if use_fast_dropout:
        fast_dropout.install(model, device)  # a no-op on GPUs; on CPU its attention replaces eager
    return model





def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def token_loss_sum(model, batch):
    """Summed cross-entropy over the non-pad target tokens of a batch.

    ``model`` may be wrapped in DistributedDataParallel; the decoder input is
    the labels shifted right, as the model itself would build them.
    """
    decoder_input_ids = getattr(model, "module", model).prepare_decoder_input_ids_from_labels(labels=batch["labels"])
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   decoder_input_ids=decoder_input_ids).logits
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), batch["labels"].view(-1), ignore_index=-100, reduction="sum")


# ---------------------------------------------------------------- precision


def add_precision_arg(parser):
    parser.add_argument("--precision", default="auto", help="auto (bf16 autocast on a CUDA GPU that has it, else fp32), "
                        "fp32 or bf16; weights and checkpoints stay fp32. fp16 is refused: T5 overflows in it")


def resolve_precision(flag: str, device) -> str:
    """'bf16' or 'fp32' for this device; fp16 and unknown values are refused in one line."""
    if flag == "fp16":
        raise UserError("--precision fp16: T5's feed-forward activations overflow fp16 (NaN losses); "
                        "use --precision bf16 (on GPUs that have it) or fp32")
    if flag not in ("auto", "fp32", "bf16"):
        raise UserError(f"--precision {flag}: use auto, fp32 or bf16")
    if flag == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if flag == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("--precision bf16: this GPU has no bf16; use --precision fp32 (or auto)")
    return flag


def autocast(device, precision: str):
    """bf16 autocast for the forward pass; fp32 weights, optimizer state and checkpoints either way."""
    import contextlib

    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def precision_note(precision: str, device) -> str:
    if device.type != "cuda":
        return precision
    if precision == "bf16":
        return "bf16 autocast, TF32 matmuls"
    if torch.cuda.is_bf16_supported():
        return "fp32, TF32 off"
    return "fp32: this GPU has no bf16; TF32 off"
