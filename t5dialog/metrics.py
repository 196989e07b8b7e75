"""Dialogue-generation metrics for T5 on DailyDialog.

Pure functions over lists of strings (no model code).  ``compute_metrics``
bundles everything; ``format_table`` renders the result and ``collapse_line``
says when the replies collapsed.  Every metric below compares one generated
``response`` with one gold ``reference``.  Every BLEU is on sacreBLEU's 0-100
scale, so that the three can be read side by side.

Tokenization (``tokenize``) -- used by BLEU-1/2, distinct-n and avg_len
-----------------------------------------------------------------------
Follows what PLATO (Bao et al., ACL 2020; PaddlePaddle/Research
``NLP/Dialogue-PLATO``) effectively scored.  There both hypothesis and
reference go through its uncased BERT tokenizer and back
(``plato/data/tokenizer.py``: lower-case, strip accents, split every
punctuation character off as its own token; ``decode`` then joins tokens with
spaces and its ``clean_string`` re-attaches ``-``, ``'``, ``n't``, ``'m``,
``'s``, ``'ve``, ``'re`` and turns ``do not`` into ``don't``), and
``evaluate_generation_result`` in ``plato/trainer.py`` splits the decoded text
on spaces.  ``tokenize`` reproduces this at word level, without the
word-piece vocabulary (so no ``[UNK]`` for characters BERT does not know).
On DailyDialog's already space-tokenized text it is essentially lower-case +
whitespace split; it also copes with detokenized model output ("fine." ->
"fine", ".").

Metrics
-------
bleu1, bleu2
    PLATO's DailyDialog BLEU (``plato/metrics/metrics.py::bleu``): NLTK
    ``sentence_bleu([ref], hyp, smoothing_function=SmoothingFunction().method7)``
    with weights (1, 0, 0, 0) and (0.5, 0.5, 0, 0), one reference per
    response, averaged over responses and multiplied by 100: scale 0-100
    (PLATO's tables give them on 0-1: 0.397 there is 39.7 here), although
    method7's n-gram-order averaging lifts an exact match of two or more
    tokens above 100 (BLEU-1 133, BLEU-2 up to 122: an NLTK quirk PLATO's
    numbers share).  An empty response scores 0.
bleu4_corpus
    ``sacrebleu.corpus_bleu(responses, [references]).score`` on the raw
    strings: sacreBLEU defaults (13a tokenization, case-sensitive, 4-grams).
    Scale 0-100.
distinct1, distinct2
    Corpus-level distinct-n (Li et al., 2016; PLATO's ``inter_dist``): number
    of distinct n-grams / total n-grams over all responses, n-grams never
    crossing a response boundary; 0 when there are no n-grams.  Exact ratio,
    without PLATO's 1e-12/1e-5 fudge terms.
f1
    ParlAI's unigram F1 (``parlai/core/metrics.py``): both sides go through
    ``normalize_answer`` (lower-case, punctuation -> space, drop a/an/the,
    collapse whitespace), then precision/recall over the multiset overlap of
    tokens (``_prec_recall_f1_score``); averaged over pairs.
avg_len
    Mean number of ``tokenize`` tokens per response (PLATO's ``len``).
top10_share
    Fraction of responses whose text (whitespace collapsed, case kept) is one
    of the 10 most frequent distinct response texts: a measure of generic
    replies ("i don't know .").  About 0.02 for DailyDialog's own references;
    ``collapse_line`` speaks up from 0.5 on.
ref_distinct1, ref_distinct2, ref_avg_len
    The same statistics on the references, as a human ceiling.
perplexity
    Not from text: ``perplexity(total_nll, total_tokens)`` for the evaluator
    to call with summed token negative log-likelihoods.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from collections.abc import Sequence

import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

__all__ = [
    "tokenize",
    "sentence_bleu_1_2",
    "bleu_1_2",
    "corpus_bleu4",
    "distinct_n",
    "normalize_answer",
    "prec_recall_f1",
    "unigram_f1",
    "mean_f1",
    "avg_length",
    "top_k_share",
    "collapse_line",
    "perplexity",
    "compute_metrics",
    "format_table",
]

# --------------------------------------------------------------------------
# Tokenization (PLATO)
# --------------------------------------------------------------------------

# PLATO's clean_string replacements, applied in this order to the
# space-joined tokens (order matters: " ' " must go before " 's").
_PLATO_REJOIN = (
    (" - ", "-"),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" do not", " don't"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)


def _is_punctuation(char: str) -> bool:
    """BERT's definition: any non-alphanumeric printable ASCII, or Unicode P*."""
    cp = ord(char)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(char).startswith("P")


def _strip_accents(text: str) -> str:
    decomposed = unicodedata.normalize("NFD", text)
    return "".join(c for c in decomposed if unicodedata.category(c) != "Mn")


def _split_punctuation(word: str) -> list[str]:
    """'fine.' -> ['fine', '.'];  "don't" -> ['don', "'", 't']."""
    pieces: list[str] = []
    current = ""
    for char in word:
        if _is_punctuation(char):
            if current:
                pieces.append(current)
                current = ""
            pieces.append(char)
        else:
            current += char
    if current:
        pieces.append(current)
    return pieces


def tokenize(text: str) -> list[str]:
    """Word tokens as PLATO scored them (see module docstring).

    >>> tokenize("I don't know, do not ask.")
    ['i', "don't", 'know', ',', "don't", 'ask', '.']
    """
    words = _strip_accents(text.lower()).split()
    joined = " ".join(p for w in words for p in _split_punctuation(w))
    for old, new in _PLATO_REJOIN:
        joined = joined.replace(old, new)
    return joined.split()


# --------------------------------------------------------------------------
# Input checks
# --------------------------------------------------------------------------


def _check_texts(texts: Sequence[str], name: str) -> None:
    if isinstance(texts, str):
        raise TypeError(f"{name} must be a list of strings, not a single string")
    if len(texts) == 0:
        raise ValueError(f"{name} is empty: need at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{name}[{i}] is {type(text).__name__}, expected str")


def _check_pairs(responses: Sequence[str], references: Sequence[str]) -> None:
    _check_texts(responses, "responses")
    _check_texts(references, "references")
    if len(responses) != len(references):
        raise ValueError(
            f"length mismatch: {len(responses)} responses vs "
            f"{len(references)} references (need exactly one reference per response)"
        )


# --------------------------------------------------------------------------
# BLEU
# --------------------------------------------------------------------------

_SMOOTH = SmoothingFunction().method7
BLEU1_WEIGHTS = (1, 0, 0, 0)
BLEU2_WEIGHTS = (0.5, 0.5, 0, 0)


def sentence_bleu_1_2(response: str, reference: str) -> tuple[float, float]:
    """(BLEU-1, BLEU-2) of one response against one reference, PLATO-style."""
    hyp, ref = tokenize(response), tokenize(reference)
    if not hyp:
        # NLTK happens to return 0 here too; being explicit keeps us safe
        # from version changes (PLATO wrapped the call in a bare except -> 0).
        return 0.0, 0.0
    return tuple(
        float(sentence_bleu([ref], hyp, weights=w, smoothing_function=_SMOOTH))
        for w in (BLEU1_WEIGHTS, BLEU2_WEIGHTS)
    )


def bleu_1_2(responses: Sequence[str], references: Sequence[str]) -> tuple[float, float]:
    """Sentence BLEU-1 and BLEU-2 (NLTK's 0-1) averaged over pairs, on sacreBLEU's 0-100 scale like corpus_bleu4."""
    _check_pairs(responses, references)
    scores = [sentence_bleu_1_2(h, r) for h, r in zip(responses, references, strict=True)]
    n = len(scores)
    return 100 * sum(s[0] for s in scores) / n, 100 * sum(s[1] for s in scores) / n


def corpus_bleu4(responses: Sequence[str], references: Sequence[str]) -> float:
    """sacreBLEU corpus BLEU-4 with default settings, on the 0-100 scale."""
    _check_pairs(responses, references)
    # force=True: DailyDialog text is already space-tokenized ("fine ."), which
    # sacreBLEU would otherwise warn about on every call; the score is the same.
    return float(sacrebleu.corpus_bleu(list(responses), [list(references)], force=True).score)


# --------------------------------------------------------------------------
# Diversity and length
# --------------------------------------------------------------------------


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / total n-grams over the whole list (0 if none)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    counts: Counter = Counter()
    for text in texts:
        tokens = tokenize(text)
        counts.update(zip(*(tokens[i:] for i in range(n)), strict=False))  # n-grams: the shifted lists end early
    total = sum(counts.values())
    return len(counts) / total if total else 0.0


def avg_length(texts: Sequence[str]) -> float:
    """Mean number of ``tokenize`` tokens per text."""
    _check_texts(texts, "texts")
    return sum(len(tokenize(t)) for t in texts) / len(texts)


def top_k_share(texts: Sequence[str], k: int = 10) -> float:
    """Fraction of texts equal to one of the k most frequent distinct texts.

    Texts are compared after collapsing whitespace (case is kept).  Summing
    the k largest counts makes ties at rank k harmless: whichever tied text
    is "chosen", the share is the same.
    """
    _check_texts(texts, "texts")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _top_k_count(texts, k)[0] / len(texts)


def _top_k_count(texts: Sequence[str], k: int) -> tuple[int, int]:
    """(how many texts are one of the k most frequent, how many different texts there are), whitespace collapsed."""
    counts = Counter(" ".join(t.split()) for t in texts)
    return sum(sorted(counts.values(), reverse=True)[:k]), len(counts)


def collapse_line(responses: Sequence[str]) -> str | None:
    """One line when the 10 most common replies are at least half of all of them (top10_share >= 0.5), else None.

    Then the model says the same few things whatever it is told, which
    averages such as BLEU hide.  Only past 20 replies: up to 20, ten
    different texts are half of them however varied the replies are.
    """
    _check_texts(responses, "responses")
    (common, different), n = _top_k_count(responses, 10), len(responses)
    if n <= 20 or common < n / 2:
        return None
    if different == 1:
        what = f"all {n:,} replies are the same text"
    elif different <= 10:
        what = f"all {n:,} replies are one of only {different} different texts"
    else:
        what = f"{common:,} of the {n:,} replies ({common / n:.0%}) are one of the 10 most common"
    return f"collapse: {what}; the model says the same few things whatever it is told"


# --------------------------------------------------------------------------
# Unigram F1 (ParlAI)
# --------------------------------------------------------------------------

_RE_ARTICLES = re.compile(r"\b(a|an|the)\b")
# ParlAI's class; note ",-." is a range that covers "," "-" ".".
_RE_PUNCT = re.compile(r"[!\"#$%&()*+,-./:;<=>?@\[\]\\^`{|}~_']")


def normalize_answer(text: str) -> str:
    """ParlAI: lower-case, punctuation -> space, drop articles, collapse spaces."""
    text = _RE_PUNCT.sub(" ", text.lower())
    text = _RE_ARTICLES.sub(" ", text)
    return " ".join(text.split())


def prec_recall_f1(
    pred_items: Sequence[str], gold_items: Sequence[str]
) -> tuple[float, float, float]:
    """ParlAI's ``_prec_recall_f1_score``: multiset overlap; all 0 if no overlap."""
    num_same = sum((Counter(gold_items) & Counter(pred_items)).values())
    if num_same == 0:
        return 0.0, 0.0, 0.0
    precision = num_same / len(pred_items)
    recall = num_same / len(gold_items)
    return precision, recall, 2 * precision * recall / (precision + recall)


def unigram_f1(response: str, reference: str) -> float:
    """ParlAI F1 of one response against one reference."""
    pred, gold = normalize_answer(response).split(), normalize_answer(reference).split()
    return prec_recall_f1(pred, gold)[2]


def mean_f1(responses: Sequence[str], references: Sequence[str]) -> float:
    """Unigram F1 averaged over pairs (0-1 scale)."""
    _check_pairs(responses, references)
    return sum(unigram_f1(h, r) for h, r in zip(responses, references, strict=True)) / len(responses)


# --------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------


def perplexity(total_nll: float, total_tokens: int = 1) -> float:
    """exp(total_nll / total_tokens), natural-log NLL summed over tokens; ``perplexity(loss)`` for a loss per token.

    Returns nan when there are no tokens (undefined, but an evaluator that
    hit an empty split should still be able to print its table) and inf on
    overflow: the one guard for it, also for train.py's log and the model card.
    """
    if total_tokens < 0:
        raise ValueError(f"total_tokens must be >= 0, got {total_tokens}")
    if total_tokens == 0:
        return float("nan")
    try:
        return math.exp(total_nll / total_tokens)
    except OverflowError:
        return float("inf")


# --------------------------------------------------------------------------
# Bundle and report
# --------------------------------------------------------------------------


def compute_metrics(responses: list[str], references: list[str]) -> dict:
    """All text metrics for aligned response/reference lists (see module doc)."""
    _check_pairs(responses, references)
    bleu1, bleu2 = bleu_1_2(responses, references)
    return {
        "num_pairs": len(responses),
        "bleu1": bleu1,
        "bleu2": bleu2,
        "bleu4_corpus": corpus_bleu4(responses, references),
        "f1": mean_f1(responses, references),
        "distinct1": distinct_n(responses, 1),
        "distinct2": distinct_n(responses, 2),
        "avg_len": avg_length(responses),
        "top10_share": top_k_share(responses, 10),
        "ref_distinct1": distinct_n(references, 1),
        "ref_distinct2": distinct_n(references, 2),
        "ref_avg_len": avg_length(references),
    }


_NOTES = {
    "bleu1": "NLTK sentence BLEU, method7, 0-100",
    "bleu2": "NLTK sentence BLEU, method7, 0-100",
    "bleu4_corpus": "sacreBLEU corpus, 0-100",
    "f1": "ParlAI unigram F1",
    "distinct1": "responses",
    "distinct2": "responses",
    "avg_len": "tokens per response",
    "top10_share": "share of 10 most frequent replies",
    "ref_distinct1": "references (ceiling)",
    "ref_distinct2": "references (ceiling)",
    "ref_avg_len": "tokens per reference",
}


def _format_value(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4f}"


def format_table(metrics: dict) -> str:
    """Aligned ``metric  value  note`` table, one row per key, in dict order."""
    rows = [(key, _format_value(val), _NOTES.get(key, "")) for key, val in metrics.items()]
    rows.insert(0, ("metric", "value", "note"))
    key_w = max(len(r[0]) for r in rows)
    val_w = max(len(r[1]) for r in rows)
    lines = [f"{k:<{key_w}}  {v:>{val_w}}  {n}".rstrip() for k, v, n in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)
