"""Tests for metrics.py: hand-computed fixtures plus cross-checks against
nltk / sacrebleu called directly."""

import math
import sys
from pathlib import Path

import pytest
import sacrebleu
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from t5dialog import metrics as m  # noqa: E402

M7 = SmoothingFunction().method7


# ---------------------------------------------------------------- tokenize


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Hello, World!", ["hello", ",", "world", "!"]),
        ("Fine .", ["fine", "."]),
        ("Fine.", ["fine", "."]),  # detokenized output splits like DailyDialog text
        ("I 'm fine", ["i'm", "fine"]),  # PLATO re-attaches 'm / 's / n't ...
        ("I don't know", ["i", "don't", "know"]),
        ("I do not go", ["i", "don't", "go"]),  # PLATO's clean_string quirk...
        ("do not go", ["do", "not", "go"]),  # ...which needs a leading space
        ("a well - known café", ["a", "well-known", "cafe"]),  # hyphen rejoined, accent stripped
        ("  many   spaces\there ", ["many", "spaces", "here"]),
        ("", []),
    ],
)
def test_tokenize(text, expected):
    assert m.tokenize(text) == expected


# ---------------------------------------------------------------- BLEU-1/2


def test_bleu_hand_case_with_method7_quirk():
    # hyp "the cat sat" (3 tokens) vs ref "the cat sat on the mat" (6 tokens).
    # Brevity penalty: exp(1 - 6/3) = e^-1.
    # Raw precisions p1 = 3/3 = 1, p2 = 2/2 = 1.  method7 = method4 then method5;
    # method4 leaves non-zero precisions alone, method5 replaces
    # p1 by (m[-1] + p1 + p2) / 3 with m[-1] = p1 + 1, i.e. (2 + 1 + 1) / 3 = 4/3.
    # BLEU-1 = e^-1 * 4/3 = 0.490506...
    b1, _ = m.sentence_bleu_1_2("The cat sat", "the cat sat on the mat")
    assert b1 == pytest.approx(math.exp(-1) * 4 / 3)


def test_bleu_single_token_hand_case():
    # hyp "a" vs ref "a b": p1 = 1/1; p2 has no bigrams (0) and method4 leaves
    # it alone for 1-token hypotheses, so method5 gives p1 = (2 + 1 + 0)/3 = 1.
    # BP = exp(1 - 2/1) = e^-1  ->  BLEU-1 = e^-1.
    b1, _ = m.sentence_bleu_1_2("A", "a b")
    assert b1 == pytest.approx(math.exp(-1))


def test_bleu_no_overlap_is_zero():
    assert m.sentence_bleu_1_2("xyz qq", "hello there") == (0.0, 0.0)


@pytest.mark.parametrize("empty", ["", "   "])
def test_bleu_empty_hypothesis_scores_zero(empty):
    assert m.sentence_bleu_1_2(empty, "hello there") == (0.0, 0.0)
    # ...and does not break the average: (0 + 0) / 2 for the first pair...
    b1, b2 = m.bleu_1_2([empty, "hello there"], ["hello there", "hello there"])
    full1, full2 = m.sentence_bleu_1_2("hello there", "hello there")
    assert (b1, b2) == pytest.approx((100 * full1 / 2, 100 * full2 / 2))


PAIRS = [
    ("I 'm not sure , maybe tomorrow .", "Maybe tomorrow , I 'm busy today ."),
    ("Sure, see you then!", "See you then ."),
    ("What time is it ?", "It is half past three ."),
    ("ok", "Okay , I will take it ."),
]


@pytest.mark.parametrize("hyp, ref", PAIRS)
def test_sentence_bleu_matches_nltk_directly(hyp, ref):
    h, r = m.tokenize(hyp), m.tokenize(ref)
    expect1 = sentence_bleu([r], h, weights=(1, 0, 0, 0), smoothing_function=M7)
    expect2 = sentence_bleu([r], h, weights=(0.5, 0.5, 0, 0), smoothing_function=M7)
    assert m.sentence_bleu_1_2(hyp, ref) == pytest.approx((expect1, expect2))


def test_bleu_average_matches_nltk_mean():
    hyps, refs = zip(*PAIRS, strict=True)
    toks = [(m.tokenize(h), m.tokenize(r)) for h, r in PAIRS]
    e1 = sum(sentence_bleu([r], h, (1, 0, 0, 0), smoothing_function=M7) for h, r in toks) / 4
    e2 = sum(sentence_bleu([r], h, (0.5, 0.5, 0, 0), smoothing_function=M7) for h, r in toks) / 4
    b1, b2 = m.bleu_1_2(list(hyps), list(refs))
    assert (b1, b2) == pytest.approx((100 * e1, 100 * e2))  # on sacreBLEU's 0-100 scale
    assert b1 > b2 > 0  # sanity: the fixture has unigram but fewer bigram matches


def test_every_bleu_is_on_sacrebleus_0_to_100_scale():
    replies = ["I am fine , thanks .", "It is three .", "See you at the station ."]
    references = ["I am fine , thank you .", "It is half past three .", "See you then at the station ."]
    out = m.compute_metrics(replies, references)
    sentence = [m.sentence_bleu_1_2(h, r) for h, r in zip(replies, references, strict=True)]  # NLTK's own 0-1
    assert out["bleu1"] == pytest.approx(100 * sum(b for b, _ in sentence) / 3)
    assert out["bleu2"] == pytest.approx(100 * sum(b for _, b in sentence) / 3)
    assert out["bleu1"] > out["bleu2"] > out["bleu4_corpus"] > 10  # each n-gram order more lowers BLEU, on one scale
    notes = {line.split()[0]: line for line in m.format_table(out).splitlines()}
    assert all("0-100" in notes[key] for key in ("bleu1", "bleu2", "bleu4_corpus"))


# ---------------------------------------------------------------- corpus BLEU


def test_corpus_bleu_matches_sacrebleu_directly():
    hyps = [h for h, _ in PAIRS]
    refs = [r for _, r in PAIRS]
    expected = sacrebleu.corpus_bleu(hyps, [refs]).score
    assert m.corpus_bleu4(hyps, refs) == pytest.approx(expected)
    assert 0 < expected < 100


def test_corpus_bleu_scale_is_0_to_100():
    same = ["hello there my friend", "how are you doing today"]
    assert m.corpus_bleu4(same, same) == pytest.approx(100.0)
    assert m.corpus_bleu4(["aaa bbb ccc ddd"], ["xxx yyy zzz www"]) == 0.0


def test_corpus_bleu_tolerates_empty_hypothesis():
    assert m.corpus_bleu4(["", ""], ["hi", "hello there"]) == 0.0


# ---------------------------------------------------------------- distinct-n


def test_distinct_hand_cases():
    texts = ["a b a", "b c"]
    # unigrams: a b a | b c -> 5 total, {a, b, c} -> 3/5
    assert m.distinct_n(texts, 1) == pytest.approx(3 / 5)
    # bigrams: (a,b) (b,a) | (b,c) -> 3 total, 3 distinct -> 1.0.
    # Crossing the boundary would add another (a,b): 3/4.
    assert m.distinct_n(texts, 2) == pytest.approx(1.0)


def test_distinct_repeats_and_case():
    # (a,a) x3 -> 1 distinct / 3 total
    assert m.distinct_n(["a a a a"], 2) == pytest.approx(1 / 3)
    # lower-cased: "hi" twice -> 1/2
    assert m.distinct_n(["Hi", "hi"], 1) == pytest.approx(1 / 2)
    # punctuation is a token: hello , world | hello -> {hello, ",", world} / 4
    assert m.distinct_n(["hello, world", "hello"], 1) == pytest.approx(3 / 4)


def test_distinct_no_ngrams_is_zero():
    assert m.distinct_n(["x", "y"], 2) == 0.0
    assert m.distinct_n([""], 1) == 0.0
    assert m.distinct_n([], 1) == 0.0


def test_distinct_rejects_bad_n():
    with pytest.raises(ValueError):
        m.distinct_n(["a b"], 0)


# ---------------------------------------------------------------- F1 (ParlAI)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat, sat!", "cat sat"),  # case, punctuation, article
        ("An apple a day", "apple day"),  # all three articles... minus "the"
        ("the THE tHe", ""),  # only articles -> empty
        ("theory anathema", "theory anathema"),  # articles only as whole words
        ("don't", "don t"),  # apostrophe becomes a space
        ("well-known...really", "well known really"),
        ("  lots \t of\nspace ", "lots of space"),
    ],
)
def test_normalize_answer(text, expected):
    assert m.normalize_answer(text) == expected


def test_f1_hand_case():
    # pred -> [cat, sat]; gold -> [cat, sat, on, mat]; overlap 2
    # P = 2/2 = 1, R = 2/4 = 0.5, F1 = 2*1*0.5/1.5 = 2/3
    assert m.unigram_f1("The cat sat.", "a cat sat on the mat") == pytest.approx(2 / 3)


def test_f1_uses_multiset_overlap():
    # pred [yes, yes, no], gold [yes, yes]: Counter & -> {yes: 2}, overlap 2
    # P = 2/3, R = 2/2 = 1, F1 = 2*(2/3)/(5/3) = 0.8
    # (a set intersection would count 1: P = 1/3, R = 1/2, F1 = 0.4)
    assert m.unigram_f1("yes yes no", "yes yes") == pytest.approx(0.8)
    # pred [yes, yes, yes], gold [yes, no]: overlap is the min count, 1
    # P = 1/3, R = 1/2, F1 = 2*(1/6)/(5/6) = 0.4
    assert m.prec_recall_f1(["yes"] * 3, ["yes", "no"]) == pytest.approx((1 / 3, 1 / 2, 0.4))


def test_f1_degenerate_cases_are_zero():
    assert m.unigram_f1("dog", "cat") == 0.0
    assert m.unigram_f1("", "cat") == 0.0
    assert m.unigram_f1("the", "a") == 0.0  # both normalize to nothing
    assert m.prec_recall_f1([], []) == (0.0, 0.0, 0.0)


def test_mean_f1_averages_pairs():
    # pair 1: exact match after normalization -> 1.0; pair 2: no overlap -> 0.0
    assert m.mean_f1(["The end!", "dog"], ["end", "cat"]) == pytest.approx(0.5)


# ---------------------------------------------------------------- length / top-10


def test_avg_length():
    # "Hello , world !" -> 4 tokens, "ok." -> [ok, .] 2 tokens, "" -> 0: 6/3 = 2
    assert m.avg_length(["Hello , world !", "ok.", ""]) == pytest.approx(2.0)


def test_top10_share_known_fixture():
    # "ok" x5 (with whitespace variants), "yes" x3, 10 singletons -> 18 responses,
    # 12 distinct texts.  Top 10 distinct: ok (5) + yes (3) + 8 singletons (8)
    # = 16 responses -> 16/18 = 8/9.
    texts = ["ok", "ok ", "  ok", "ok\n", "ok", "yes", "yes", "yes"]
    texts += [f"reply number {i}" for i in range(10)]
    assert len(texts) == 18
    assert m.top_k_share(texts, 10) == pytest.approx(8 / 9)


def test_top10_share_extremes_and_case():
    distinct = [f"r{i}" for i in range(20)]
    assert m.top_k_share(distinct) == pytest.approx(10 / 20)
    assert m.top_k_share(["same"] * 7) == 1.0
    # exact text: case is kept, so "OK" and "ok" are different replies.
    # 11 texts, 11 distinct -> top 10 cover 10/11.
    assert m.top_k_share(["OK", "ok"] + [f"r{i}" for i in range(9)]) == pytest.approx(10 / 11)


def test_top_k_share_k():
    # counts a:3, b:2, c:1 -> top-1 = 3/6, top-2 = 5/6
    texts = ["a", "a", "a", "b", "b", "c"]
    assert m.top_k_share(texts, 1) == pytest.approx(3 / 6)
    assert m.top_k_share(texts, 2) == pytest.approx(5 / 6)


# ---------------------------------------------------------------- perplexity


def test_a_collapse_is_one_line_naming_how_few_replies_there_are():
    line = m.collapse_line(["I I I ."] * 29 + ["I I ."])
    assert "\n" not in line and "all 30 replies are one of only 2 different texts" in line
    few = [f"reply {i % 12}" for i in range(40)]  # 12 texts: the 10 most common are 34 of the 40 replies
    assert "34 of the 40 replies (85%) are one of the 10 most common" in m.collapse_line(few)


@pytest.mark.parametrize("replies", [
    [f"reply {i}" for i in range(30)],  # all different
    [f"reply {i % 25}" for i in range(50)],  # the 10 most common: 20 of 50
    ["same"] * 20,  # 20 replies or fewer: ten different texts would cover half of them however varied they were
], ids=["distinct", "varied", "few"])
def test_varied_replies_or_too_few_to_tell_are_no_collapse(replies):
    assert m.collapse_line(replies) is None


def test_perplexity():
    assert m.perplexity(0.0, 5) == 1.0
    # mean NLL ln 4 -> perplexity 4
    assert m.perplexity(3 * math.log(4), 3) == pytest.approx(4.0)
    assert math.isnan(m.perplexity(0.0, 0))
    assert m.perplexity(1e6, 1) == math.inf
    with pytest.raises(ValueError):
        m.perplexity(1.0, -1)


# ---------------------------------------------------------------- compute_metrics


RESPONSES = ["I don't know .", "I don't know .", "See you then!", "Sure , it is ."]
REFERENCES = ["I have no idea .", "Let me think about it .", "See you then .", "Yes , it is ."]

EXPECTED_KEYS = {
    "num_pairs", "bleu1", "bleu2", "bleu4_corpus", "f1", "distinct1", "distinct2",
    "avg_len", "top10_share", "ref_distinct1", "ref_distinct2", "ref_avg_len",
}


def test_compute_metrics_keys_and_values():
    out = m.compute_metrics(RESPONSES, REFERENCES)
    assert set(out) == EXPECTED_KEYS
    b1, b2 = m.bleu_1_2(RESPONSES, REFERENCES)
    assert out["num_pairs"] == 4
    assert out["bleu1"] == pytest.approx(b1)
    assert out["bleu2"] == pytest.approx(b2)
    expected_bleu4 = sacrebleu.corpus_bleu(RESPONSES, [REFERENCES]).score
    assert out["bleu4_corpus"] == pytest.approx(expected_bleu4)
    assert out["f1"] == pytest.approx(m.mean_f1(RESPONSES, REFERENCES))
    # responses tokens: [i don't know .] x2, [see you then !], [sure , it is .]
    # -> 4+4+4+5 = 17 tokens; distinct: i don't know . see you then ! sure , it is = 12
    assert out["distinct1"] == pytest.approx(12 / 17)
    assert out["avg_len"] == pytest.approx(17 / 4)
    # 3 distinct texts, all inside the top 10 -> 1.0
    assert out["top10_share"] == 1.0
    # references: 5+6+4+5 = 20 tokens; distinct: i have no idea . let me think
    # about it see you then yes , is = 16
    assert out["ref_distinct1"] == pytest.approx(16 / 20)
    assert out["ref_avg_len"] == pytest.approx(20 / 4)
    assert out["ref_distinct2"] == pytest.approx(m.distinct_n(REFERENCES, 2))
    assert out["distinct2"] != out["ref_distinct2"]  # computed on different lists


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "fn",
    [m.compute_metrics, m.bleu_1_2, m.corpus_bleu4, m.mean_f1],
)
def test_length_mismatch_raises(fn):
    with pytest.raises(ValueError, match="2 responses vs 1 references"):
        fn(["a", "b"], ["a"])


@pytest.mark.parametrize("fn", [m.compute_metrics, m.bleu_1_2, m.corpus_bleu4, m.mean_f1])
def test_empty_lists_raise(fn):
    with pytest.raises(ValueError, match="empty"):
        fn([], [])


def test_empty_single_list_helpers_raise():
    with pytest.raises(ValueError, match="empty"):
        m.avg_length([])
    with pytest.raises(ValueError, match="empty"):
        m.top_k_share([])


def test_bad_types_raise():
    with pytest.raises(TypeError):
        m.compute_metrics("a b", "a b")  # strings, not lists
    with pytest.raises(TypeError, match=r"responses\[1\]"):
        m.compute_metrics(["a", None], ["a", "b"])


# ---------------------------------------------------------------- format_table


def test_format_table():
    out = m.compute_metrics(RESPONSES, REFERENCES)
    out["perplexity"] = 12.3456789  # keys added by the caller are shown too
    table = m.format_table(out)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value", "note"]
    assert set(lines[1]) == {"-"}
    body = lines[2:]
    assert [line.split()[0] for line in body] == list(out)
    assert "12.3457" in table
    assert f"{out['bleu1']:.4f}" in table
    assert "0-100" in table  # the scale note for bleu4_corpus
    # values right-aligned: every value ends in the same column
    value_ends = {line.index(line.split()[1]) + len(line.split()[1]) for line in lines[:1] + body}
    assert len(value_ends) == 1
