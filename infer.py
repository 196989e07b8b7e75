"""Talk to a fine-tuned checkpoint.

    python infer.py "How are you?"          # one response on stdout
    python infer.py                         # chat (keeps the conversation; /reset, /quit, /help)
    echo "Hi there" | python infer.py       # one response per input line (answered in batches)
    python infer.py --serve                 # a chat page and two APIs on http://127.0.0.1:8000/ (t5dialog/serve/)
    python infer.py --checkpoint DIR ...    # a given checkpoint (default: best, else latest)
    python infer.py --precision bf16 ...    # bf16 autocast (auto: bf16 on a GPU that has it)

The model input is built by `dataset.encode_history`, the same function
training used, so the model sees the conversation in the format it learned.
"""

from __future__ import annotations

import functools
import sys

import torch

from dataset import as_text, encode_history
from t5dialog import cli
from t5dialog.cli import OneLineParser, UserError, pick_device, run_script
from t5dialog.dialogues import check_prompt
from t5dialog.generation import (
    DEFAULT_DIR,
    add_generation_args,
    find_and_load,
    generate_ids,
    generate_response,
    generation_options,
    max_input_length,
    stream_response,
)
from t5dialog.models import autocast, resolve_precision, set_math_mode
from t5dialog.piped import BATCH, line_batches
from t5dialog.serve import server as serve

warn = functools.partial(cli.warn, "infer.py")


# ---------------------------------------------------------------- CLI


HELP = """commands: /reset forgets the conversation, /quit leaves, /help lists these
keys: arrows edit the line and Up recalls earlier messages; Ctrl-C stops a reply, Ctrl-D leaves"""


def chat(model, tokenizer, device, max_length, options):
    """Interactive chat; the history is trimmed to fit by encode_history; replies show as they are written.

    Ctrl-C while the model writes cancels that reply and keeps the
    conversation; Ctrl-C (or Ctrl-D) at the prompt leaves. A line that
    starts with / is a command and never reaches the model.
    """
    if sys.stdin.isatty():
        enable_line_editing()
    print("Chat with the model. /help lists the commands, /quit (or Ctrl-D) leaves; Ctrl-C stops a reply.",
          file=sys.stderr)
    history: list[str] = []
    while True:
        try:
            text = as_text(input("you> ")).strip()
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return
        if text in ("/quit", "/exit"):
            return
        if text == "/reset":
            history = []
            print("(conversation forgotten)", file=sys.stderr)
            continue
        if text in ("/help", "/?"):
            print(HELP, file=sys.stderr)
            continue
        if text.startswith("/"):  # a mistyped command sent to the model would only get an odd reply
            print(f"unknown command {text.split()[0]}; /help lists them", file=sys.stderr)
            continue
        if not text:
            continue
        try:
            reply = say(stream_response(text, model, tokenizer, device, history=history, max_length=max_length, **options))
        except KeyboardInterrupt:
            print("\n(reply cancelled; the conversation is kept. Ctrl-C at the prompt leaves)", file=sys.stderr)
            continue
        history += [text, reply]


def enable_line_editing():
    """input() with GNU readline (or libedit): arrow keys edit the line, Up recalls earlier messages.

    Imported only for a terminal: readline writes escape sequences that
    would land in piped output. Windows' Python has no readline.
    """
    try:
        import readline  # noqa: F401  (importing it is what hooks it into input())
    except ImportError:
        pass


def say(pieces) -> str:
    """Print ``bot> `` and the reply piece by piece as it comes; return the whole reply.

    Flushed at each piece: shown at once even when stdout is a pipe (| tee).
    A reply cut short (Ctrl-C) still ends its line.
    """
    reply = ""
    try:
        for piece in pieces:
            print(piece if reply else f"bot> {piece}", end="", flush=True)
            reply += piece
    except BaseException:
        if reply:
            print(flush=True)
        raise
    print("" if reply else "bot> ", flush=True)
    return reply


def line_text(raw: bytes, number: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        warn(f"line {number} is not valid UTF-8; its undecodable bytes were replaced by U+FFFD")
        return raw.decode("utf-8", "replace")


def answer_lines(batches, model, tokenizer, device, max_length, options):
    """Piped input (batches of lines of bytes): one response line per input line, in order.

    Each batch is one `generate` call; `generate_ids` pads it, so greedy and
    beam replies are the ones a line alone would get. Whitespace inside a
    reply is collapsed to single spaces: a byte-level tokenizer (BART, GPT-2)
    can write "\n" or "\r" in a reply, and a reader pairs output line k with input line k.
    """
    number = 0
    for batch in batches:
        texts = []
        for raw in batch:
            number += 1
            texts.append(line_text(raw, number))
            if not texts[-1].strip():
                warn(f"line {number} is empty; answered with an empty line")
        inputs = [encode_history(tokenizer, [t], max_length) for t in texts if t.strip()]
        replies = iter(generate_ids(inputs, model, tokenizer, device, **options) if inputs else [])
        for t in texts:
            print(" ".join(next(replies).split()) if t.strip() else "", flush=True)


def build_parser():
    p = OneLineParser(prog="infer.py", description="Talk to a fine-tuned T5 dialogue checkpoint.")
    p.add_argument("prompt", nargs="?", default=None, help="one message to answer; omit for chat (or piped lines)")
    cli.add_checkpoint_arg(p, DEFAULT_DIR)
    cli.add_device_arg(p)
    cli.add_precision_arg(p)
    add_generation_args(p)
    serve.add_serve_args(p)
    return p


def run(argv) -> int:
    args = build_parser().parse_args(argv)
    options = generation_options(args)
    prompt = None if args.prompt is None else check_prompt(as_text(args.prompt))  # refused before the model loads
    server = serve.open_server(args, prompt)  # None without --serve; bound before the load, so a busy port fails fast
    # A closed stream (`<&-`, `>&-`) is None in Python: replies printed to it vanish with exit code 0, and
    # reading it is an AttributeError. Said before the model loads.
    if server is None and sys.stdout is None:
        raise UserError("standard output is closed (>&-), so the replies would be lost; redirect it to a file instead")
    if server is None and prompt is None and sys.stdin is None:
        raise UserError('standard input is closed (<&-): give a prompt, e.g. python infer.py "How are you?", or pipe lines in')
    device = pick_device(args.device)
    precision = resolve_precision(args.precision, device)
    set_math_mode(device, precision)
    path, model, tokenizer = find_and_load(args.checkpoint, device, warn)
    max_length = max_input_length(path)
    torch.manual_seed(args.seed)
    with autocast(device, precision):
        if server is not None:
            serve.serve(server, model, tokenizer, device, precision, max_length, options, path)
        elif prompt is not None:
            # Flushed here, inside run_script's handlers: a reader that left must not fail Python's exit-time flush.
            print(generate_response(prompt, model, tokenizer, device, max_length=max_length, **options), flush=True)
        elif sys.stdin.isatty():
            print(f"loaded {path} ({device}, {precision})", file=sys.stderr)
            chat(model, tokenizer, device, max_length, options)
        else:
            # Sampled replies depend on which lines share a batch; one at a time they stay reproducible with --seed.
            size = 1 if options["do_sample"] else BATCH
            answer_lines(line_batches(sys.stdin.fileno(), size), model, tokenizer, device, max_length, options)
    return 0


def main(argv=None) -> int:
    return run_script("infer.py", run, argv, out_of_memory="lower --num-beams or --max-new-tokens, or use --device cpu")


if __name__ == "__main__":
    sys.exit(main())
