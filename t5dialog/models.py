"""The model: which one to start from, its decoding defaults, its loss, its precision.

- `load_pretrained`: a hub name or a local folder (safetensors only, no
  remote code); offline, the Hugging Face cache. A model that cannot work
  (not encoder-decoder, no tokenizer, damaged weights) is a `ModelProblem`.
- `build_scratch`: a small T5 (`SCRATCH_CONFIG`) with a Unigram tokenizer
  trained on the training text, for machines that cannot get t5-small.
- `set_decoding_defaults`: both give their model `GENERATION_DEFAULTS` as its
  own generation config, which save_pretrained writes into every checkpoint.
- `token_loss_sum`: the training loss, shared by training, validation and
  eval.py's perplexity.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from t5dialog import fast_dropout, hub
from t5dialog.cli import UserError
from t5dialog.dialogues import SEPARATOR, read_dialogues
from t5dialog.files import first_line

DEFAULT_MODEL = "t5-small"
MIN_SCRATCH_VOCAB = 64  # the tokenizer trainer needs room for the special tokens and the alphabet's pieces
# Generation defaults, chosen for chat: 64 new tokens rather than the library's
# 20 (which cuts replies mid-sentence), greedy decoding so answers are
# reproducible, and no repeated 3-grams, the usual cure for greedy loops.
# Checkpoints carry them in generation_config.json, so `generate` anywhere decodes the same.
GENERATION_DEFAULTS = dict(max_new_tokens=64, num_beams=1, do_sample=False, top_p=1.0, top_k=50, temperature=1.0,
                           no_repeat_ngram_size=3, repetition_penalty=1.0)
# Decoding settings transformers uses only when sampling, or only with several beams. Left in a config that does
# neither, they make every `generate` warn, and save_pretrained refuses to write the config.
SAMPLING_ONLY = ("top_p", "top_k", "temperature")
BEAM_ONLY = ("early_stopping", "length_penalty")
# A T5 sized for a laptop CPU when t5-small cannot be had (about 8.5M parameters
# with an 8k vocabulary): same architecture, 4 encoder + 4 decoder layers.
SCRATCH_CONFIG = dict(d_model=256, d_ff=1024, d_kv=64, num_heads=4, num_layers=4, num_decoder_layers=4, dropout_rate=0.1)


# ---------------------------------------------------------------- loading

# The files a saved tokenizer leaves: a vocabulary (tokenizer.json; SentencePiece's spiece.model,
# sentencepiece.bpe.model or tokenizer.model; BPE's vocab.json; WordPiece's vocab.txt), or for a byte-level
# tokenizer such as ByT5's, which needs no vocabulary, tokenizer_config.json alone.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "sentencepiece.bpe.model", "tokenizer.model")
# Words every English tokenizer spells without <unk>. The stand-in transformers builds when a folder has no
# vocabulary (a T5's: 104 tokens, specials and sentinels) spells none of them, and under it training still
# reports a falling loss: it learns to predict <unk>.
PROBE_WORDS = ("hello", "how", "are", "you", "today")
SEQ2SEQ_HINT = "use t5-small, google/flan-t5-base, facebook/bart-base or another seq2seq (encoder-decoder) model"
NO_TOKENIZER_FIX = "save the tokenizer with the model: tokenizer.save_pretrained(DIR)"


class ModelProblem(UserError):
    """A model that is there but cannot work: the wrong kind, no tokenizer, damaged weights.

    Never a reason to train from scratch instead, as an unreachable default model is.
    """


@contextlib.contextmanager
def library_quiet():
    """transformers' warnings about a config we may refuse would turn the one-line error into several."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def check_seq2seq(name, who: str, **kwargs):
    """Refuse a config AutoModelForSeq2SeqLM cannot load (GPT-2, BERT...), by its class: the library's own
    error for it reads like a damaged folder."""
    from transformers import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING, AutoConfig

    with library_quiet():
        config = AutoConfig.from_pretrained(name, **kwargs)
    if type(config) not in MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING:
        raise ModelProblem(f"{who} is not an encoder-decoder model ({type(config).__name__}); {SEQ2SEQ_HINT}")


def check_tokenizer(tokenizer, who: str):
    """Refuse a tokenizer that spells no probe word without <unk> or another special token (or at all)."""
    specials = set(tokenizer.all_special_ids)
    for word in PROBE_WORDS:
        ids = tokenizer.encode(word, add_special_tokens=False)
        if ids and not specials.intersection(ids):
            return
    raise ModelProblem(f"{who} has no tokenizer vocabulary (its {len(tokenizer)}-token tokenizer turns every word into <unk> "
                       f"or nothing: transformers makes one up when no file holds a vocabulary); {NO_TOKENIZER_FIX}")


def damaged_weights(who: str, file: str, e: BaseException) -> ModelProblem:
    return ModelProblem(f"{who}: {file} is damaged or truncated ({first_line(e)}); save or download the model again")


def check_folder(folder: Path, who: str):
    """The tokenizer of a local model folder, once its files show the model can work.

    The weights are read only as far as their headers: a folder that cannot
    work is refused in a second, before gigabytes are loaded.
    """
    from safetensors import SafetensorError, safe_open
    from transformers import AutoTokenizer

    check_seq2seq(folder, who)
    # Before the library is asked: with no file it makes up a tokenizer or fails in its own words.
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelProblem(f"{who} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); {NO_TOKENIZER_FIX}")
    # safetensors' header gives every tensor's offsets, so reading it finds a file cut short anywhere.
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt"):
                pass
        except SafetensorError as e:
            raise damaged_weights(who, weights.name, e) from None
    tokenizer = AutoTokenizer.from_pretrained(folder)
    check_tokenizer(tokenizer, who)
    return tokenizer


def cannot_load(name: str, e: BaseException) -> UserError:
    return UserError(f"cannot load --model {name} ({first_line(e)}); check the name or folder, or use --model scratch")


def load_pretrained(name: str, who: str | None = None):
    """Model and tokenizer from a local folder or the hub (or its cache when offline).

    ``who``: how errors name the model (e.g. "--model NAME"); ModelProblem for one that cannot work.
    """
    who = who or name
    if Path(name).is_dir():
        tokenizer = check_folder(Path(name), who)
        return load_weights(name, who), tokenizer
    revision, cache_only = hub.pin_revision(name)  # the load's own first question to the hub; no answer: the cache
    if revision is not None and not cache_only:
        # A commit never changes, so what the cache holds of it needs no question per file (nor its retries).
        with contextlib.suppress(OSError, ModelProblem):  # not all of it is cached: the hub, below
            return load_from_hub(name, who, revision=revision, local_files_only=True)
    return load_from_hub(name, who, revision=revision, local_files_only=cache_only)


def load_from_hub(name: str, who: str, **source):
    """Config and tokenizer files first, the weights only for a model that can work; ``source``: where from."""
    from transformers import AutoTokenizer

    check_seq2seq(name, who, **source)
    tokenizer = AutoTokenizer.from_pretrained(name, **source)
    check_tokenizer(tokenizer, who)
    return load_weights(name, who, **source), tokenizer


def load_weights(name: str, who: str, **source):
    from safetensors import SafetensorError
    from transformers import AutoModelForSeq2SeqLM

    try:
        model = AutoModelForSeq2SeqLM.from_pretrained(name, use_safetensors=True, **source)
    except SafetensorError as e:
        raise damaged_weights(who, "model.safetensors", e) from None
    set_decoding_defaults(model)
    return model


def load_checkpoint(path: Path):
    """Model and tokenizer of a checkpoint folder written by train.py (or save_pretrained)."""
    from transformers import AutoModelForSeq2SeqLM

    try:
        tokenizer = check_folder(path, f"checkpoint {path}")
        model = AutoModelForSeq2SeqLM.from_pretrained(path, use_safetensors=True)
    except ModelProblem:
        raise
    except Exception as e:  # any other failure here means a broken folder, whatever the library raised
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
    model = T5ForConditionalGeneration(config)
    set_decoding_defaults(model)
    return model, tokenizer


def choose_model(name: str, named_by_user: bool, train_file, scratch_vocab_size: int, seed: int, log):
    """(model, tokenizer, name): --model, or scratch when the default can't be had."""
    if name == "scratch":
        return (*build_scratch(train_file, scratch_vocab_size, seed), "scratch")
    try:
        # A local folder is recorded absolute, so --resume (which compares --model) works from any cwd.
        return (*load_pretrained(name, f"--model {name}"), str(Path(name).resolve()) if Path(name).is_dir() else name)
    except (OSError, ValueError) as e:  # not found, unreachable, unreadable (a ModelProblem is neither: it stops here)
        if named_by_user:  # the user named it: never swap in something else
            raise cannot_load(name, e) from None
    bar = "!" * 78
    log(f"{bar}\nWARNING: the default model '{DEFAULT_MODEL}' is not available (no connection to the Hugging Face hub\n"
        f"and not in its cache). Training a SMALL T5 FROM SCRATCH instead (see SCRATCH_CONFIG in models.py).\n"
        f"Its replies will be far worse than a fine-tuned t5-small. Pass --model scratch to silence this.\n{bar}")
    return (*build_scratch(train_file, scratch_vocab_size, seed), "scratch")


# ---------------------------------------------------------------- decoding defaults


def unused_settings(options: dict) -> tuple[str, ...]:
    """The decoding settings ``options`` leaves unused: the sampling ones when not sampling, the beam ones with one beam."""
    return (() if options.get("do_sample") else SAMPLING_ONLY) + (BEAM_ONLY if options.get("num_beams", 1) == 1 else ())


def set_decoding_defaults(model):
    """Make GENERATION_DEFAULTS the model's own decoding settings, with its special token ids.

    save_pretrained writes them into every checkpoint's generation_config.json,
    so `generate` anywhere answers as infer.py does instead of stopping at the
    library's 20 tokens. The base model's other settings (BART's forced tokens) stay.
    """
    config = copy.deepcopy(model.generation_config)
    config.update(**GENERATION_DEFAULTS)
    config.update(**dict.fromkeys(unused_settings(GENERATION_DEFAULTS)))  # unset, including a base model's leftovers
    for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
        if getattr(config, name, None) is None:
            setattr(config, name, getattr(model.config, name, None))
    model.generation_config = config


# ---------------------------------------------------------------- training


def prepare_for_training(model, device, precision: str, attention: str, use_fast_dropout: bool):
    """On the device, with the attention kernel and CUDA math settings the run asked for."""
    model = model.to(device)  # weights stay fp32 whatever the precision: autocast casts per operation
    set_math_mode(device, precision)
    attention = attention if attention != "auto" else ("sdpa" if device.type == "cuda" else "eager")
    model.set_attn_implementation(attention)
    if use_fast_dropout and attention == "eager":  # an explicit --attention sdpa keeps torch's dropout
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

PRECISIONS = ("auto", "fp32", "tf32", "bf16")


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 that runs at speed: any CPU (autocast), an Ampere-or-newer NVIDIA GPU, any ROCm GPU."""
    if device.type != "cuda":
        return device.type == "cpu"
    if not torch.cuda.is_available():
        return False
    # torch.cuda.is_bf16_supported() asks about the current device and counts slow emulation as support.
    return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def resolve_precision(flag: str, device) -> str:
    """--precision as "fp32" or "bf16" for ``device``; UserError for fp16 or an unknown value."""
    device = torch.device(device)
    if flag in ("fp16", "float16", "half"):
        # T5 was trained in bfloat16; in fp16 its feed-forward activations exceed 65504 (fp16's largest value)
        # and become inf, then NaN.
        raise UserError(f"--precision {flag}: T5's feed-forward activations overflow fp16 (NaN losses); "
                        "use --precision bf16 or fp32")
    if flag not in PRECISIONS:
        raise UserError(f"--precision {flag}: not a precision; use auto, fp32, tf32 or bf16")
    if flag == "auto":
        return "bf16" if device.type == "cuda" and bf16_supported(device) else "fp32"
    if flag == "tf32" and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 8):
        raise UserError(f"--precision tf32: TF32 is a matmul mode of Ampere-or-newer NVIDIA GPUs, not of {device}; "
                        "use --precision fp32")
    if flag == "bf16" and not bf16_supported(device):
        raise UserError(f"--precision bf16: {device} has no native bfloat16 (a GPU older than Ampere); use --precision fp32")
    return flag


def autocast(device, precision: str):
    """The context the model runs in: bf16 autocast (weights stay fp32), or nothing for fp32."""
    if precision in ("fp32", "tf32"):
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32', 'tf32' or 'bf16' (from resolve_precision), got {precision!r}")


def set_math_mode(device, precision: str):
    """TF32 matmuls on CUDA for tf32 and bf16 (what autocast leaves in fp32 runs faster); fp32 means strict fp32."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision in ("tf32", "bf16")


def precision_note(precision: str, device) -> str:
    """For the banner: what the device computes in."""
    if torch.device(device).type != "cuda":
        return precision
    notes = {"bf16": "bf16 autocast, TF32 matmuls", "tf32": "fp32 weights and activations, TF32 matmuls",
             "fp32": "fp32, TF32 off"}
    if precision == "fp32" and not bf16_supported(torch.device(device)):
        return "fp32 (this GPU has no bf16); TF32 off"
    return notes[precision]
