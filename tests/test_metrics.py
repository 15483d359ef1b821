"""edgekif.metrics against values counted by hand on small strings."""

from __future__ import annotations

import pytest

from edgekif import metrics
from edgekif.metrics import (
    chrf_scores,
    exact_match_scores,
    normalize_answer,
    normalized_exact_match_scores,
    rouge_l_scores,
    score,
    score_kind,
    strip_end_of_turn,
)


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("World", "world"),
        ("  World.\n", "world"),
        ("World<|im_end|>", "world"),
        ("Sports </s>", "sports"),
        ("Science or Technology!?", "science or technology"),
        ("very   positive", "very positive"),
        ("Science & Technology", "science & technology"),  # inner punctuation stays
        ("Ja.<|im_end|><|endoftext|>", "ja"),
        ("ÜBER。", "über"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_exact_match_strict_and_normalized():
    answers = ["World", "world.", " Sports ", "Business<|im_end|>", "Sci"]
    labels = ["World", "World", "Sports", "Business", "Science"]
    assert exact_match_scores(answers, labels) == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert normalized_exact_match_scores(answers, labels) == [1.0, 1.0, 1.0, 1.0, 0.0]
    assert score("exact_match", answers, labels).mean == pytest.approx(2 / 5)
    assert score("normalized_exact_match", answers, labels).mean == pytest.approx(4 / 5)


def test_rouge_l_against_counted_lcs():
    # reference: the cat sat on the mat (6 words); answer: the cat on a mat (5 words)
    # LCS = "the cat on mat" = 4 words: P = 4/5, R = 4/6, F1 = 2PR/(P+R) = 8/11
    # second: one shared word of 2 and 3: P = 1/2, R = 1/3, F1 = 2/5
    # third: no word in common; fourth: identical after lower-casing and punctuation
    answers = ["the cat on a mat", "big dog", "xyz", "Jury Rules for Kodak!"]
    refs = ["the cat sat on the mat", "a dog barks", "abc", "jury rules for kodak"]
    assert rouge_l_scores(answers, refs) == pytest.approx([8 / 11, 2 / 5, 0.0, 1.0])
    s = score("rouge_l", answers, refs)
    assert s.n == 4 and s.mean == pytest.approx((8 / 11 + 2 / 5 + 1) / 4)


def test_rouge_l_order_matters_for_lcs():
    # reversed order: LCS of (a b c d) and (d c b a) is one word: P = R = 1/4
    assert rouge_l_scores(["d c b a"], ["a b c d"]) == pytest.approx([0.25])


def test_rouge_l_reads_other_scripts():
    """rouge-score's own tokenizer drops every non-ASCII letter (all Greek answers would score 0)."""
    # Greek: 2 of 3 words in order -> P = 2/2, R = 2/3, F1 = 0.8
    assert rouge_l_scores(["καλή μέρα"], ["καλή μέρα φίλε"]) == pytest.approx([0.8])
    # Chinese: one character a word; 3 of 4 characters in order -> P = 1, R = 3/4, F1 = 6/7
    assert rouge_l_scores(["你好吗"], ["你好朋吗"]) == pytest.approx([6 / 7])


def test_rouge_l_tokens_equal_rouge_scores_own_on_ascii():
    from rouge_score import tokenize

    text = "BAGHDAD, Iraq - Two U.S. soldiers (aged 21_22) don't x2!"
    assert metrics._WordTokenizer().tokenize(text) == tokenize.tokenize(text, None)


def test_end_of_turn_text_is_not_scored():
    assert strip_end_of_turn("a headline <|im_end|>") == "a headline"
    assert rouge_l_scores(["a headline<|im_end|>"], ["a headline"]) == pytest.approx([1.0])


def test_chrf_against_counted_ngrams():
    # hyp "ab", ref "abc" (sacrebleu: character n-grams 1..6, beta 2, orders the hypothesis
    # lacks are left out of the averages):
    #   1-grams: hyp {a, b}, ref {a, b, c}: P = 2/2, R = 2/3
    #   2-grams: hyp {ab},   ref {ab, bc}:  P = 1/1, R = 1/2
    #   avg P = 1, avg R = 7/12; chrF = (1 + 4) P R / (4 P + R) = (35/12) / (55/12) = 7/11
    assert chrf_scores(["ab"], ["abc"]) == pytest.approx([7 / 11], abs=1e-4)
    assert chrf_scores(["same text"], ["same text"]) == pytest.approx([1.0])
    assert chrf_scores(["xyz"], ["abc"]) == pytest.approx([0.0])


def test_score_kind_headline_first():
    cls = score_kind("classification", ["World."], ["World"])
    assert list(cls) == ["normalized_exact_match", "exact_match"]
    assert cls["normalized_exact_match"].mean == 1.0 and cls["exact_match"].mean == 0.0
    gen = score_kind("generation", ["the cat on a mat"], ["the cat sat on the mat"])
    assert list(gen) == ["rouge_l", "chrf"]
    assert gen["rouge_l"].scores == pytest.approx([8 / 11])


def test_bad_calls_say_what_is_wrong():
    with pytest.raises(ValueError, match="unknown metric 'bleu'"):
        score("bleu", ["a"], ["a"])
    with pytest.raises(ValueError, match="2 answers for 1 references"):
        score("rouge_l", ["a", "b"], ["a"])
    with pytest.raises(ValueError, match="unknown task kind"):
        score_kind("regression", ["a"], ["a"])
    assert score("chrf", [], []).mean is None  # nothing measured is not a 0


def test_normalisation_strips_sentence_ends_only_and_never_empties_a_label():
    from edgekif.metrics import normalize_answer, normalized_exact_match_scores

    assert [normalize_answer(x) for x in ("World.", "Sports!! ", "是。", "yes<|im_end|>", "Sci/Tech")] == ["world", "sports", "是", "yes", "sci/tech"]
    assert [normalize_answer(x) for x in ("सकारात्मक।", "إيجابي؟", "World．", "አዎ።")] == ["सकारात्मक", "إيجابي", "world", "አዎ"]
    # a label's own punctuation stays: grades, keys and emoticons are different labels
    assert normalized_exact_match_scores(["A", "C", ":(", ""], ["A-", "C#", ":)", "-"]) == [0.0, 0.0, 0.0, 0.0]
    assert normalized_exact_match_scores(["A-.", "?", "..."], ["a-", "?", "..."]) == [1.0, 1.0, 1.0]


def test_rouge_keeps_words_with_combining_marks_whole():
    """Devanagari and Tamil vowel signs are marks (Unicode M*), not letters: a tokenizer of
    letters only cut "की" to "क", so different words matched."""
    from edgekif.metrics import _WordTokenizer, rouge_l_scores

    tok = _WordTokenizer()
    assert tok.tokenize("राम की किताब") == ["राम", "की", "किताब"]
    assert tok.tokenize("வணக்கம் உலகம்") == ["வணக்கம்", "உலகம்"]
    assert rouge_l_scores(["राम के कोट"], ["राम की किताब"]) == [1 / 3]  # one word of three shared, not 0.73
