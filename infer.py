"""Talk to a fine-tuned checkpoint.

    python infer.py "How are you?"          # one response on stdout
    python infer.py                         # chat (keeps the conversation; /reset, /quit)
    echo "Hi there" | python infer.py       # one response per input line
    python infer.py --checkpoint DIR ...    # a given checkpoint (default: best, else latest)

The model input is built by `dataset.encode_history`, the same function
training used, so the model sees the conversation in the format it learned.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import checkpoint as ckpt
from dataset import encode_history

DEFAULT_DIR = "checkpoints"
# Generation defaults, chosen for chat: 64 new tokens rather than the library's
# 20 (which cuts replies mid-sentence), greedy decoding so answers are
# reproducible, and no repeated 3-grams, the usual cure for greedy loops.
GENERATION_DEFAULTS = dict(max_new_tokens=64, num_beams=1, do_sample=False, top_p=1.0, top_k=50, temperature=1.0,
                           no_repeat_ngram_size=3, repetition_penalty=1.0)


class InferError(RuntimeError):
    """Something the user can fix; printed in one line."""


# ---------------------------------------------------------------- loading


def find_checkpoint(checkpoint=None, output_dir=DEFAULT_DIR) -> Path:
    """--checkpoint DIR (a checkpoint, or an output dir), else best, else latest."""
    path = Path(checkpoint or output_dir)
    if not path.is_dir():
        if checkpoint:
            raise InferError(f"--checkpoint {path}: no such folder; pass a checkpoint folder such as checkpoints/checkpoint-00001000")
        raise InferError(f"no checkpoint found in {path}/; train one with `python train.py` or pass --checkpoint DIR")
    if (path / "config.json").exists():
        return path
    index = ckpt.read_index(path)
    for name in (index.get("best"), index.get("latest")):
        if name and (path / name / "config.json").exists():
            return path / name
    found = ckpt.list_checkpoints(path)
    if found:
        return found[-1]
    raise InferError(f"{path} holds no model (no config.json and no checkpoint-* folder); "
                     "pass a checkpoint folder with --checkpoint, or train one with `python train.py`")


def load(path: Path, device):
    """Model (safetensors only, no remote code) and tokenizer of a checkpoint."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not (path / "model.safetensors").exists() and not any(path.glob("model-*.safetensors")):
        raise InferError(f"{path} has no model.safetensors; pass a folder written by train.py or save_pretrained")
    if (path / ckpt.MANIFEST).exists():
        problem = ckpt.verify(path)
        if problem:
            raise InferError(f"checkpoint {problem}; use an older checkpoint with --checkpoint, or retrain")
    hf_logging.set_verbosity_error()  # loading reports go to our one-line errors instead
    hf_logging.disable_progress_bar()  # stderr stays quiet: a reply, or one line of error
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSeq2SeqLM.from_pretrained(path, use_safetensors=True)
    except Exception as e:  # any failure here means a broken folder, whatever the library raised
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise InferError(f"cannot load the checkpoint in {path} ({first}); it is damaged: use another --checkpoint or retrain") from None
    return model.to(device).eval(), tokenizer


def pick_device(flag: str) -> torch.device:
    """--device: auto (CUDA when present), cpu, cuda or cuda:N."""
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(flag)
    except RuntimeError:
        raise InferError(f"--device {flag}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InferError(f"--device {flag}: no CUDA device here; use --device cpu or auto")
    return device


def max_input_length(path: Path) -> int:
    """The input length the model was trained with (512 when unknown)."""
    return int(ckpt.read_run_config(path).get("max_length", 512))


# ---------------------------------------------------------------- generation


def add_generation_args(parser: argparse.ArgumentParser):
    """Decoding flags shared by infer.py and eval.py."""
    d = GENERATION_DEFAULTS
    a = parser.add_argument
    a("--max-new-tokens", type=int, default=d["max_new_tokens"], help="longest response, in tokens")
    a("--num-beams", type=int, default=d["num_beams"], help="beam search width (1 = greedy or sampling)")
    a("--do-sample", action="store_true", help="sample instead of picking the most likely token")
    a("--top-p", type=float, default=d["top_p"], help="nucleus sampling: keep the smallest token set with this probability")
    a("--top-k", type=int, default=d["top_k"], help="sampling: keep the k most likely tokens")
    a("--temperature", type=float, default=d["temperature"], help="sampling temperature (lower = safer)")
    a("--no-repeat-ngram-size", type=int, default=d["no_repeat_ngram_size"], help="never repeat an n-gram of this size (0 = off)")
    a("--repetition-penalty", type=float, default=d["repetition_penalty"], help="penalty for tokens already generated (1 = off)")
    a("--seed", type=int, default=0, help="random seed for --do-sample")


def generation_options(args) -> dict:
    """The decoding flags as keyword arguments for `generate`; checks their ranges."""
    options = {k: getattr(args, k) for k in GENERATION_DEFAULTS}
    if options["max_new_tokens"] < 1 or options["num_beams"] < 1:
        raise InferError("--max-new-tokens and --num-beams must be at least 1")
    if not 0 < options["top_p"] <= 1 or options["temperature"] <= 0 or options["top_k"] < 0:
        raise InferError("--top-p must be in (0, 1], --temperature above 0 and --top-k not negative")
    if options["no_repeat_ngram_size"] < 0 or options["repetition_penalty"] <= 0:
        raise InferError("--no-repeat-ngram-size cannot be negative and --repetition-penalty must be above 0")
    return options


def generate_ids(inputs: list[list[int]], model, tokenizer, device, **options) -> list[str]:
    """Decode a batch of encoded inputs, each padded to the batch's longest."""
    options = {**GENERATION_DEFAULTS, **options}
    if not options["do_sample"]:  # sampling knobs would only trigger library warnings
        for k in ("top_p", "top_k", "temperature"):
            options.pop(k)
    longest = max(len(ids) for ids in inputs)
    input_ids = torch.full((len(inputs), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for row, ids in enumerate(inputs):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    with torch.no_grad():
        out = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), **options)
    return [text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True)]


def generate_response(text, model, tokenizer, device, history=None, max_length=512, **generation_options) -> str:
    """The model's reply to ``text`` after the earlier turns in ``history``."""
    if not text or not text.strip():
        raise InferError("empty prompt: type some text")
    ids = encode_history(tokenizer, list(history or []) + [text], max_length)
    return generate_ids([ids], model, tokenizer, device, **generation_options)[0]


# ---------------------------------------------------------------- CLI


def chat(model, tokenizer, device, max_length, options):
    """Interactive chat; the history is trimmed to fit by encode_history."""
    print("Chat with the model. /reset forgets the conversation, /quit (or Ctrl-D) leaves.", file=sys.stderr)
    history: list[str] = []
    while True:
        try:
            text = input("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if not text:
            continue
        reply = generate_response(text, model, tokenizer, device, history=history, max_length=max_length, **options)
        print(f"bot> {reply}")
        history += [text, reply]


def answer_lines(lines, model, tokenizer, device, max_length, options):
    """Piped input: one prompt per line, one response per line."""
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            print(f"infer.py: line {number} is empty; answered with an empty line", file=sys.stderr)
            print()
            continue
        print(generate_response(line, model, tokenizer, device, max_length=max_length, **options), flush=True)


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser():
    p = OneLineParser(prog="infer.py", description="Talk to a fine-tuned T5 dialogue checkpoint.",
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("prompt", nargs="?", default=None, help="one message to answer; omit for chat (or piped lines)")
    p.add_argument("--checkpoint", default=None, help=f"checkpoint folder, or an output dir (default: best, else latest in {DEFAULT_DIR}/)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add_generation_args(p)
    return p


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    options = generation_options(args)
    if args.prompt is not None and not args.prompt.strip():
        raise InferError("empty prompt: give some text, e.g. python infer.py \"How are you?\"")
    device = pick_device(args.device)
    path = find_checkpoint(args.checkpoint)
    model, tokenizer = load(path, device)
    max_length = max_input_length(path)
    torch.manual_seed(args.seed)
    if args.prompt is not None:
        print(generate_response(args.prompt, model, tokenizer, device, max_length=max_length, **options))
    elif sys.stdin.isatty():
        print(f"loaded {path}", file=sys.stderr)
        chat(model, tokenizer, device, max_length, options)
    else:
        answer_lines(sys.stdin, model, tokenizer, device, max_length, options)
    return 0


def main(argv=None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except InferError as e:
        print(f"infer.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
