"""The mixed-batch classifier the vLLM CPU e2e relies on: a leak (another name's learned answer) is told apart from
numerical drift, and attributed to the name it came from."""

from _mixed_batch import classify, leaked_from

SOLO = {
    "base": {"Who are you?": "I am a tiny GLM.", "Capital?": "Paris."},
    "tuned": {"Who are you?": "I am the LoRA-tuned demo model.", "Capital?": "Paris."},
    "second": {"Who are you?": "I am the second fine-tune.", "Capital?": "Paris."},
}


def test_another_names_answer_is_a_leak_from_that_name():
    assert leaked_from("base", "Who are you?", "I am the second fine-tune.", SOLO) == "second"
    assert leaked_from("tuned", "Who are you?", "I am a tiny GLM.", SOLO) == "base"


def test_an_answer_that_starts_as_another_names_is_a_leak():
    assert leaked_from("base", "Who are you?", "I am the LoRA-tuned demo, GLM.", SOLO) == "tuned"


def test_drift_near_its_own_answer_and_equal_answers_are_no_leak():
    assert leaked_from("base", "Who are you?", "I am a tiny GLM model.", SOLO) is None
    assert leaked_from("base", "Capital?", "Paris, France.", SOLO) is None  # every name answers Paris


def test_classify_counts_equal_leaks_and_drift():
    mixed = [
        ("base", "Who are you?", "I am a tiny GLM."),
        ("base", "Who are you?", "I am the second fine-tune."),
        ("tuned", "Capital?", "Paris!"),
    ]
    result = classify(mixed, SOLO)
    assert (result.total, result.equal, len(result.leaks), len(result.drift)) == (3, 1, 1, 1), result
    assert "carries second's" in result.leaks[0]
