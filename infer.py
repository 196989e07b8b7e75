"""Talk to a fine-tuned checkpoint.

    python infer.py "How are you?"          # one response on stdout
    python infer.py                         # chat (keeps the conversation; /reset, /quit)
    echo "Hi there" | python infer.py       # one response per input line
    python infer.py --checkpoint DIR ...    # a given checkpoint (default: best, else latest)

The model input is built by `dataset.encode_history`, the same function
training used, so the model sees the conversation in the format it learned.
"""

from __future__ import annotations

import sys

import torch

from cli import OneLineParser, UserError, pick_device, run_script
from dataset import encode_history
from generation import DEFAULT_DIR, add_generation_args, find_checkpoint, generate_ids, generation_options, load, max_input_length


def generate_response(text, model, tokenizer, device, history=None, max_length=512, **options) -> str:
    """The model's reply to ``text`` after the earlier turns in ``history``."""
    if not text or not text.strip():
        raise UserError("empty prompt: type some text")
    ids = encode_history(tokenizer, list(history or []) + [text], max_length)
    return generate_ids([ids], model, tokenizer, device, **options)[0]


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


def build_parser():
    p = OneLineParser(prog="infer.py", description="Talk to a fine-tuned T5 dialogue checkpoint.")
    p.add_argument("prompt", nargs="?", default=None, help="one message to answer; omit for chat (or piped lines)")
    p.add_argument("--checkpoint", default=None, help=f"checkpoint folder, or an output dir (default: best, else latest in {DEFAULT_DIR}/)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    add_generation_args(p)
    return p


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    options = generation_options(args)
    if args.prompt is not None and not args.prompt.strip():
        raise UserError("empty prompt: give some text, e.g. python infer.py \"How are you?\"")
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
    return run_script("infer.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
