import pytest

from aligna.metrics import edit_distance, perplexity, phoneme_error_rate, score, strip_stress, word_error_rate


def test_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2
    assert edit_distance(["R", "IY1", "D"], ["R", "EH1", "D"]) == 1


def test_word_error_rate_accepts_any_reference():
    refs = [["R IY1 D", "R EH1 D"], ["L IY1 D"], ["K AE1 T"]]
    hyps = ["R EH1 D", "L EH1 D", "K AE1  T"]  # whitespace differences do not count
    assert word_error_rate(hyps, refs) == pytest.approx(100 / 3)


def test_phoneme_error_rate_uses_the_closest_reference():
    refs = [["R IY1 D", "R EH1 D"], ["L IY1 D"]]
    hyps = ["R EH1 D", "L EH1"]  # 0 errors against the 2nd reference; 2 errors against 3 phonemes
    assert phoneme_error_rate(hyps, refs) == pytest.approx(100 * 2 / 6)


def test_error_rates_without_stress_ignore_only_the_stress_digits():
    refs = [["K AH0 M P Y UW1 T ER0"], ["R IY1 D", "R EH1 D"], ["AH0 B AW1 T"]]
    hyps = ["K AH1 M P Y UW1 T ER0", "R IY0 D", "AH0 B AW1"]  # stress wrong, stress wrong, phoneme missing
    scores = score(hyps, refs, ["wer", "wer_nostress", "per", "per_nostress"])
    assert scores.values["wer"] == pytest.approx(100.0)
    assert scores.values["wer_nostress"] == pytest.approx(100 / 3)  # only the missing T is still wrong
    assert scores.values["per"] == pytest.approx(100 * 3 / 15)
    assert scores.values["per_nostress"] == pytest.approx(100 * 1 / 15)
    assert strip_stress("HH AH0 L OW1") == "HH AH L OW"


def test_bleu_and_chrf_carry_signatures_and_agree_with_sacrebleu():
    import sacrebleu

    hyps = ["a dog runs in the snow .", "two men play soccer ."]
    refs = [["a dog is running in the snow ."], ["two men are playing soccer ."]]
    scores = score(hyps, refs, ["bleu", "chrf", "tok_bleu"])
    expected = sacrebleu.corpus_bleu(hyps, [[r[0] for r in refs]]).score
    assert scores.values["bleu"] == pytest.approx(expected)
    assert "tok:13a" in scores.signatures["bleu"] and "nrefs:1" in scores.signatures["bleu"]
    assert "tok:none" in scores.signatures["tok_bleu"] and "case:lc" in scores.signatures["tok_bleu"]
    assert scores.values["chrf"] > 0


def test_variable_reference_counts_and_perfect_output():
    refs = [["the cat sat ."], ["a dog .", "one dog ."]]
    scores = score(["the cat sat .", "one dog ."], refs, ["bleu", "wer"])
    assert scores.values["bleu"] == pytest.approx(100.0)
    assert scores.values["wer"] == 0.0
    assert "nrefs:var" in scores.signatures["bleu"]


def test_tokenized_bleu_ignores_case():
    scores = score(["A Dog runs ."], [["a dog runs ."]], ["tok_bleu", "bleu"])
    assert scores.values["tok_bleu"] == pytest.approx(100.0)
    assert scores.values["bleu"] < 100.0


def test_perplexity():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(7.389, rel=1e-3)


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        score(["a", "b"], [["a"]], ["bleu"])


def test_a_string_is_not_a_reference_list():
    """score() read "a b" as the references "a", " ", "b" and scored them without an error."""
    with pytest.raises(TypeError, match=r"references\[1\]: a non-empty list of reference strings"):
        score(["a b", "c d"], [["a b"], "c d"], ["bleu"])
    with pytest.raises(TypeError, match=r"references\[0\]"):
        score(["a b"], [[]], ["wer"])
