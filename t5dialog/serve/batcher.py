"""The model behind the server, shared by concurrent requests: those waiting when it frees up are generated together.

A request becomes a `Job`. One worker thread owns the model: it takes the
oldest waiting job and every other waiting job whose decoding settings can
share its batch (up to ``max_batch``), and runs one `generate` for them.
Each row streams to its own job; a row ends on its own (its max_new_tokens,
</s>, a stop string, a client that left) and is answered at that step, while
the others go on. A seeded sampled
request runs alone, so that its seed alone decides its reply. Waiting is
bounded: ``queue`` counts the jobs beyond what the next batch takes, and
past it a request is refused at once (Busy, a 503) rather than left waiting.

The worker hands each job's events to the job's asyncio loop: ("text", piece),
then ("done", reply) or ("error", one line).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from pathlib import Path

import torch
from transformers import StoppingCriteria, StoppingCriteriaList, TextStreamer

from t5dialog.dialogues import encode_history
from t5dialog.files import first_line
from t5dialog.generation import ReplyPieces, decode, generate_tokens
from t5dialog.models import autocast, unused_settings

CLOSING = "the server is stopping; this reply was cut short"


class Busy(Exception):
    """The waiting line is full."""


@dataclasses.dataclass(eq=False)
class Job:
    """One request's row: its input, its settings, and what has come of it so far."""

    ids: list[int]  # the encoded conversation
    options: dict  # generate's keyword arguments, max_new_tokens included
    loop: asyncio.AbstractEventLoop
    seed: int | None = None
    stops: tuple[str, ...] = ()
    events: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)
    left: bool = False  # the client went away: its row stops
    answered: bool = False  # its handler has read the last event
    finished: bool = False  # its last event is sent: the rest of its row (pads) is no longer its business
    completion_tokens: int = 0
    finish_reason: str = "stop"  # or "length": it wrote max_new_tokens without ending

    def __post_init__(self):
        self.pieces = ReplyPieces(self.stops)

    def batch_key(self):
        """Jobs with equal keys can share a batch: the settings that matter, but max_new_tokens (each row stops at its own).

        A batch of beams stops together, so beam search keeps max_new_tokens in its key.
        """
        if self.options["do_sample"] and self.seed is not None:
            return ("alone", id(self))
        unused = unused_settings(self.options) + (("max_new_tokens",) if self.options["num_beams"] == 1 else ())
        return tuple(sorted((name, value) for name, value in self.options.items() if name not in unused))

    @property
    def max_new_tokens(self) -> int:
        return self.options["max_new_tokens"]

    def done(self) -> bool:
        return self.left or self.pieces.stopped

    def send(self, kind: str, value):
        """Hand an event to the request's handler (from the worker thread)."""
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class RowStreamer(TextStreamer):
    """transformers' TextStreamer for one row of a batch: its finished text goes to the job."""

    def __init__(self, tokenizer, job: Job):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.job = job

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if self.job.finished:  # answered already (its row ended before the batch did)
            return
        if piece := self.job.pieces.add(text):
            self.job.send("text", piece)


class BatchStreamer:
    """What `generate` hands its tokens to: each row's token goes to that row's streamer."""

    def __init__(self, rows: list[RowStreamer]):
        self.rows = rows

    def put(self, value: torch.Tensor):
        for i, row in enumerate(self.rows):
            row.put(value[i:i + 1])

    def end(self):
        for row in self.rows:
            row.end()


class RowsDone(StoppingCriteria):
    """Per row: it has written its own max_new_tokens or </s>, met a stop string, or lost its client; all rows when closing.

    A row that ends is answered at once (``row_ended``), not when the batch's
    longest row ends.
    """

    def __init__(self, jobs: list[Job], closing: threading.Event, eos_token_id: int | None, row_ended):
        self.jobs, self.closing, self.eos, self.row_ended = jobs, closing, eos_token_id, row_ended

    def __call__(self, input_ids, scores, **kwargs):
        written = input_ids.shape[1] - 1  # after the decoder's start token
        if self.closing.is_set():
            return torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        if len(self.jobs) != input_ids.shape[0]:  # beam search: rows are beams; a batch of beams stops together
            return torch.full((input_ids.shape[0],), all(job.done() for job in self.jobs), device=input_ids.device)
        wrote_eos = (input_ids[:, -1] == self.eos).tolist()  # one read per step, not one per row
        done = []
        for job, row, eos in zip(self.jobs, input_ids, wrote_eos, strict=True):
            done.append(job.finished or job.done() or written >= job.max_new_tokens or eos)
            if done[-1] and not job.finished:
                self.row_ended(job, row)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class Engine:
    """The loaded model, the waiting jobs, and the one thread that generates."""

    def __init__(self, model, tokenizer, device, precision, max_length, options, checkpoint, queue: int, max_batch: int):
        self.model, self.tokenizer, self.device, self.precision = model, tokenizer, device, precision
        self.max_length, self.options, self.checkpoint = max_length, dict(options), Path(checkpoint)
        self.queue, self.max_batch = queue, max_batch
        self.waiting: list[Job] = []
        self.ready = threading.Condition()  # guards `waiting`; notified when a job arrives or the server closes
        self.closing = threading.Event()
        self.stopped_early = 0  # rows ended because their client left
        self.batch_sizes = collections.Counter()  # how many batches of each size were generated
        self.worker = threading.Thread(target=self.run, name="generate", daemon=True)

    def start(self):
        self.worker.start()

    def close(self, timeout: float = 30.0):
        """Stop: rows in flight end at their next token, waiting jobs get an error, the worker is joined."""
        with self.ready:
            self.closing.set()
            self.ready.notify_all()
            for job in self.waiting:
                job.send("error", CLOSING)
            self.waiting.clear()
        if self.worker.is_alive():
            self.worker.join(timeout)

    def encode(self, turns: list[str]) -> list[int]:
        return encode_history(self.tokenizer, turns, self.max_length)

    def submit(self, job: Job):
        with self.ready:
            if self.closing.is_set():
                raise Busy(CLOSING)
            self.drop_left()
            if len(self.waiting) >= self.max_batch + self.queue:
                raise Busy(f"the model is busy and {len(self.waiting)} requests already wait "
                           f"(--max-batch {self.max_batch} --queue {self.queue}); retry shortly")
            self.waiting.append(job)
            self.ready.notify()

    def next_batch(self) -> list[Job]:
        """The oldest waiting job and those that can share its batch, oldest first; waits for one to come."""
        with self.ready:
            while not self.waiting and not self.closing.is_set():
                self.ready.wait()
            self.drop_left()
            if not self.waiting:
                return []
            key = self.waiting[0].batch_key()
            batch = [job for job in self.waiting if job.batch_key() == key][:self.max_batch]
            self.waiting = [job for job in self.waiting if job not in batch]
            return batch

    def drop_left(self):
        """Forget the waiting jobs whose clients have gone (called holding `ready`)."""
        for job in self.waiting:
            if job.left:
                job.finished = True
                job.send("error", "the client left")
        self.waiting = [job for job in self.waiting if not job.left]

    def run(self):
        while not self.closing.is_set():
            if batch := self.next_batch():
                self.generate(batch)

    def generate(self, jobs: list[Job]):
        self.batch_sizes[len(jobs)] += 1
        first = jobs[0]
        options = dict(first.options, max_new_tokens=max(job.max_new_tokens for job in jobs))
        if options["num_beams"] == 1:  # beam search cannot stream: its best beam is known only at the end
            options["streamer"] = BatchStreamer([RowStreamer(self.tokenizer, job) for job in jobs])
        ended = RowsDone(jobs, self.closing, self.tokenizer.eos_token_id, self.finish)
        options["stopping_criteria"] = StoppingCriteriaList([ended])
        try:
            if first.seed is not None:
                torch.manual_seed(first.seed)
            with autocast(self.device, self.precision):  # autocast is per thread: infer.py's does not reach this one
                rows = generate_tokens([job.ids for job in jobs], self.model, self.tokenizer, self.device, **options)
        except Exception as error:  # one line for each client and the log; the server keeps serving
            for job in jobs:
                if not job.finished:
                    job.finished = True
                    job.send("error", f"generation failed: {type(error).__name__}: {first_line(error)}")
            return
        for job, row in zip(jobs, rows, strict=True):
            if not job.finished:
                self.finish(job, row)

    def finish(self, job: Job, row: torch.Tensor):
        """Send a job its last events, from its row of output ids (the decoder's start token first)."""
        job.finished = True
        reply = decode(self.tokenizer, row[None])[0]
        written = row[1:]
        job.completion_tokens = int((written != self.tokenizer.pad_token_id).sum())
        ended = self.tokenizer.eos_token_id in written.tolist()
        job.finish_reason = "stop" if ended or job.pieces.stopped or job.pieces.cut(reply) is not None else "length"
        if job.left:
            self.stopped_early += 1
            job.send("error", "the client left")
        elif self.closing.is_set() and job.finish_reason == "length" and job.completion_tokens < job.max_new_tokens:
            job.send("error", CLOSING)
        else:
            if rest := job.pieces.finish(reply):
                job.send("text", rest)
            job.send("done", job.pieces.final(reply))
