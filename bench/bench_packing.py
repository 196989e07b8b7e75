"""Does packing several examples per row (block-diagonal masks) beat our bucketed batches?

    python bench/bench_packing.py --data-dir DIR                 # DIR/train.txt, small T5, 60 batches each way
    python bench/bench_packing.py --data-dir DIR --row-src 512   # longer rows: fewer pad tokens, more attention work

T5's relative position bias depends only on distances, so an example packed
into a row with others, masked from them (encoder, decoder and cross
attention), computes exactly what it computes alone: the script checks that
first (dropout off, loss of packed rows == loss of the same examples padded).
Then it times training steps (forward, backward, AdamW) over the same
examples both ways and prints real tokens/s and padding efficiency.
Rows hold inputs up to --row-src tokens and targets up to --row-tgt tokens
(first fit, longest first); an example longer than a row gets a row of its own.
DIR holds train.txt in DailyDialog format (data/sample, or data/dailydialog
after `python data/download.py`).
"""

from __future__ import annotations

import random
import sys
import time

import benchlib
import torch
import torch.nn.functional as F

from dataset import DailyDialogDataset, batch_cost, collate, token_budget_batches
from t5dialog import fast_dropout, models
from t5dialog.cli import OneLineParser, UserError, run_script


def pack_rows(src, tgt, ids, row_src, row_tgt):
    """First-fit-decreasing rows of example ids within (row_src, row_tgt) tokens."""
    rows, fill = [], []
    for i in sorted(ids, key=lambda i: -src[i]):
        for r, (s, t) in enumerate(fill):
            if s + src[i] <= row_src and t + tgt[i] <= row_tgt:
                rows[r].append(i)
                fill[r] = (s + src[i], t + tgt[i])
                break
        else:
            rows.append([i])
            fill.append((src[i], tgt[i]))
    return rows


def packed_batch(ds, rows, start_id):
    """Tensors for rows of packed examples: ids, labels, per-segment decoder inputs and 4-D additive masks."""
    S = max(sum(ds.src_lengths[i] for i in r) for r in rows)
    T = max(sum(ds.tgt_lengths[i] for i in r) for r in rows)
    B, pad = len(rows), ds.pad_id
    input_ids, labels = torch.full((B, S), pad), torch.full((B, T), -100)
    dec_in = torch.full((B, T), pad)
    seg_s, seg_t = torch.full((B, S), -1), torch.full((B, T), -2)  # segment of each position; pads -1 / -2
    for b, r in enumerate(rows):
        s = t = 0
        for k, i in enumerate(r):
            e = ds.examples[i]
            n, m = len(e["input_ids"]), len(e["labels"])
            input_ids[b, s : s + n] = torch.tensor(e["input_ids"])
            labels[b, t : t + m] = torch.tensor(e["labels"])
            dec_in[b, t] = start_id  # each segment's decoder starts afresh
            dec_in[b, t + 1 : t + m] = torch.tensor(e["labels"][:-1])
            seg_s[b, s : s + n], seg_t[b, t : t + m] = k, k
            s, t = s + n, t + m
    neg = torch.finfo(torch.float32).min

    def same(a, c):  # (B, 1, q, k): query and key positions in the same example
        return (a[:, :, None] == c[:, None, :])[:, None]

    # Real tokens see only their own example; pad positions see other pads (or, as
    # decoder queries over the input, nothing: a uniform average), which no real
    # token reads and no label scores.
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    enc = torch.zeros(B, 1, S, S).masked_fill(~same(seg_s, seg_s), neg)
    dec = torch.zeros(B, 1, T, T).masked_fill(~(same(seg_t, seg_t) & causal), neg)
    cross = torch.zeros(B, 1, T, S).masked_fill(~same(seg_t, seg_s), neg)
    return {"input_ids": input_ids, "labels": labels, "decoder_input_ids": dec_in, "enc": enc, "dec": dec, "cross": cross}


def packed_loss_sum(model, p):
    h = model.encoder(input_ids=p["input_ids"], attention_mask=p["enc"]).last_hidden_state
    d = model.decoder(input_ids=p["decoder_input_ids"], attention_mask=p["dec"], encoder_hidden_states=h,
                      encoder_attention_mask=p["cross"]).last_hidden_state
    if model.config.scale_decoder_outputs:
        d = d * model.model_dim**-0.5
    logits = model.lm_head(d)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), p["labels"].view(-1), ignore_index=-100, reduction="sum")


def timed(model, batches, loss_fn, cost):
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, foreach=True)
    model.train()
    for b in batches[:2]:  # warm-up
        loss_fn(b).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    real = processed = 0
    start = time.perf_counter()
    for b in batches[2:]:
        loss = loss_fn(b)
        (loss / 1000).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        r, p = cost(b)
        real, processed = real + r, processed + p
    return real / (time.perf_counter() - start), real / processed


def run(argv) -> int:
    ap = OneLineParser(prog="bench_packing.py", description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", default=None, help="folder holding train.txt (and validation.txt), e.g. data/sample")
    ap.add_argument("--batches", type=int, default=60, help="bucketed batches timed (the packed run covers the same examples)")
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--row-src", type=int, default=256)
    ap.add_argument("--row-tgt", type=int, default=64)
    args = ap.parse_args(argv)
    train_file, _ = benchlib.data_files(args.data_dir)
    if min(args.batches, args.max_tokens, args.row_src, args.row_tgt) < 1:
        raise UserError("--batches, --max-tokens, --row-src and --row-tgt must be positive")
    torch.manual_seed(0)
    model, tok = models.build_scratch(train_file, 8000, seed=42)
    ds = DailyDialogDataset(tok, train_file, 512, 128)
    src, tgt = ds.src_lengths, ds.tgt_lengths
    bucketed = token_budget_batches(src, tgt, args.max_tokens, seed=42, epoch=0)
    random.Random(0).shuffle(bucketed)
    bucketed = bucketed[: args.batches]
    ids = [i for b in bucketed for i in b]
    rows = pack_rows(src, tgt, ids, args.row_src, args.row_tgt)
    random.Random(0).shuffle(rows)

    def packed_cost(rs):  # padded tokens, as batch_cost counts them, with a row's length its examples' sum
        return len(rs) * (max(sum(src[i] for i in r) for r in rs) + max(sum(tgt[i] for i in r) for r in rs))

    packed, cur = [], []  # rows grouped into the same token budget
    for r in rows:
        trial = cur + [r]
        if cur and packed_cost(trial) > args.max_tokens:
            packed.append(cur)
            trial = [r]
        cur = trial
    packed.append(cur)
    start_id = model.config.decoder_start_token_id
    fast_dropout.install(model, torch.device("cpu"))

    # Correctness: packed rows give the loss of the same examples unpacked (dropout off).
    model.eval()
    with torch.no_grad():
        check = packed[0]
        a = packed_loss_sum(model, packed_batch(ds, check, start_id))
        b = models.token_loss_sum(model, collate([ds.examples[i] for r in check for i in r], ds.pad_id))
    print(f"packed vs unpacked loss on {sum(map(len, check))} examples: {a.item():.4f} vs {b.item():.4f}")
    assert torch.allclose(a, b, rtol=1e-4), (a, b)

    def cost_bucketed(b):
        return sum(src[i] + tgt[i] for i in b), batch_cost(src, tgt, b)

    def cost_packed(rs):
        return sum(src[i] + tgt[i] for r in rs for i in r), packed_cost(rs)

    bt, be = timed(model, bucketed, lambda b: models.token_loss_sum(model, collate([ds.examples[i] for i in b], ds.pad_id)),
                   cost_bucketed)
    pt, pe = timed(model, packed, lambda rs: packed_loss_sum(model, packed_batch(ds, rs, start_id)), cost_packed)
    print(f"{len(ids)} examples, {torch.get_num_threads()} threads")
    print(f"bucketed: {len(bucketed)} batches, padding efficiency {be:.1%}, {bt:,.0f} real tokens/s")
    print(f"packed (rows {args.row_src}+{args.row_tgt}): {len(packed)} batches, padding efficiency {pe:.1%}, "
          f"{pt:,.0f} real tokens/s")
    print(f"packed / bucketed: {pt / bt:.2f}x")
    return 0


def main(argv=None) -> int:
    return run_script("bench_packing.py", run, argv)


if __name__ == "__main__":
    sys.exit(main())
