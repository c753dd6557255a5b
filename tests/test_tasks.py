"""Task prompt builders: length, needle depth and placement, turn order, CWE counts, scoring, determinism."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from asrkf_edge.bench.tasks import NEEDLES, SMALL_TALK, Case, cwe, haystack_text, needle, needle_multiturn, passkey

tok = str.split  # one token per whitespace-separated word: fast, and enough to check lengths


def document(prompt: str) -> str:
    return re.search(r"<document>\n(.*)\n</document>", prompt, re.S).group(1)  # type: ignore[union-attr]


def turns(prompt: str) -> list[tuple[str, str]]:
    """(role, content) of each ChatML turn; the last is the open assistant turn."""
    parts = prompt.split("<|im_start|>")[1:]
    return [(p.split("\n", 1)[0], p.split("\n", 1)[1].removesuffix("<|im_end|>\n")) for p in parts]


def cwe_items(prompt: str) -> list[str]:
    items = re.findall(r"^(\d+)\. (\S+)$", prompt, re.M)
    assert [int(n) for n, _ in items] == list(range(1, len(items) + 1))
    return [w for _, w in items]


def test_haystack_is_shipped_prose_matching_the_tests_copy() -> None:
    text = haystack_text()
    assert text.startswith("GNU GENERAL PUBLIC LICENSE") and len(text) > 30000
    assert text == (Path(__file__).parent / "data" / "gpl-3.0.txt").read_text()


def test_needles_are_distinct_absent_from_the_haystack_and_self_answering() -> None:
    hay = Case("", "", 0, 0.0)
    assert len(NEEDLES) >= 6 and len({n.answer.lower() for n in NEEDLES}) == len(NEEDLES)
    for n in NEEDLES:
        assert Case("", n.answer, 0, 0.0).score(n.fact) == 1.0
        assert Case("", n.answer, 0, 0.0).score(haystack_text()) == 0.0, n.answer
        assert n.fact not in haystack_text() and hay.score(n.question) == 0.0
        for q, a in SMALL_TALK:
            assert Case("", n.answer, 0, 0.0).score(q + " " + a) == 0.0


@pytest.mark.parametrize("builder", [needle, needle_multiturn])
@pytest.mark.parametrize("n", [300, 1000, 4000, 9000])
def test_chat_needle_length_is_close_to_target_and_counted(builder, n: int) -> None:
    case = builder(tok, n, 0.5, 3)
    assert case.n_tokens == len(tok(case.prompt))
    assert n - 3 <= case.n_tokens <= n
    assert case.rendered and case.answer == NEEDLES[3].answer


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
@pytest.mark.parametrize("builder", [needle, needle_multiturn])
def test_needle_sits_at_the_requested_depth_on_a_sentence_boundary(builder, depth: float) -> None:
    for index in (0, 5):
        case = builder(tok, 3000, depth, index)
        fact = NEEDLES[index].fact
        doc = document(case.prompt)
        assert doc.count(fact) == 1
        at = doc.index(fact)
        rest = (doc[:at] + doc[at + len(fact):]).strip()
        assert abs(at / len(rest) - depth) < 0.06, (at / len(rest), depth)
        assert at == 0 or re.search(r"([.!?][\"')]?\s+|\n\s*)$", doc[:at]), doc[max(0, at - 40): at]


def test_question_comes_after_the_document_in_the_single_user_turn() -> None:
    for index, nd in enumerate(NEEDLES):
        case = needle(tok, 1000, 0.5, index)
        (role, content), (last, open_) = turns(case.prompt)
        assert (role, last, open_) == ("user", "assistant", "")
        assert content.count(nd.question) == 1 and case.prompt.count(nd.question) == 1
        assert content.index("</document>") < content.index(nd.question)
        assert case.prompt.endswith("<|im_start|>assistant\n")


def test_multiturn_asks_in_the_last_user_turn_after_two_unrelated_turns() -> None:
    nd = NEEDLES[2]
    case = needle_multiturn(tok, 2000, 0.3, 2)
    ts = turns(case.prompt)
    assert [r for r, _ in ts] == ["user", "assistant"] * 4
    assert ts[-1][1] == ""
    assert nd.fact in ts[0][1] and nd.question not in ts[0][1]
    assert [(ts[2][1], ts[3][1]), (ts[4][1], ts[5][1])] == list(SMALL_TALK)
    assert nd.question in ts[6][1] and "<document>" not in ts[6][1]
    assert case.prompt.count(nd.question) == 1


def test_chat_tasks_are_deterministic_and_vary_with_index() -> None:
    for build in (lambda i: needle(tok, 800, 0.4, i), lambda i: needle_multiturn(tok, 800, 0.4, i),
                  lambda i: cwe(tok, 800, i)):
        assert build(1) == build(1)
        assert build(1).prompt != build(2).prompt


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        needle(tok, 1000, 1.5, 0)
    with pytest.raises(ValueError):
        needle_multiturn(tok, 20, 0.5, 0)
    with pytest.raises(ValueError):
        cwe(tok, 1000, 0, k=0)
    with pytest.raises(ValueError):
        cwe(tok, 8000, 0)  # more than the word pool can fill at 2 tokens an item


@pytest.mark.parametrize(("n", "k", "freq", "rare"), [(1000, 3, 20, 2), (2000, 5, 15, 2), (3500, 4, 30, 3)])
def test_cwe_common_words_are_the_k_most_frequent_by_a_margin(n: int, k: int, freq: int, rare: int) -> None:
    case = cwe(tok, n, 7, k=k, freq_common=freq)
    assert n - 6 <= case.n_tokens <= n and case.n_tokens == len(tok(case.prompt))
    counts = Counter(cwe_items(case.prompt))
    top = counts.most_common()
    assert {w for w, _ in top[:k]} == set(case.answers) and len(case.answers) == k
    assert all(c == freq for _, c in top[:k]) and max(c for _, c in top[k:]) == rare
    assert len(top) - k >= 10 * k  # plenty of distractors
    assert f"What are the {k} most common words in the above list?" in turns(case.prompt)[0][1]
    assert case.vocab == frozenset(counts)


def test_needle_score_ignores_case_and_punctuation_but_wants_whole_words() -> None:
    case = Case("", "Silver Heron", 0, 0.5)
    assert case.score("It was the SILVER-heron!") == 1.0 and case.correct("silver heron.")
    assert case.score("The Silver Herons") == 0.0 and case.score("") == 0.0 and not case.correct("silver")
    assert Case("", "1742", 0, 0.5).score("In 1,742.") == 1.0
    assert Case("", "71432", 0, 0.5).score("714320") == 0.0


def test_cwe_score_gives_partial_credit_for_the_first_k_list_words_only() -> None:
    case = cwe(tok, 1000, 3)
    a, b, c = case.answers
    other = sorted(case.vocab - set(case.answers))
    assert case.score(f"The most common words are {a}, {b} and {c}.") == 1.0
    assert case.score(f"1. {c.upper()}\n2. {other[0]}\n3. {a}") == pytest.approx(2 / 3)
    assert case.score(f"{other[0]}, {other[1]}, {other[2]}") == 0.0
    assert case.score(" ".join([*other[:3], a, b, c])) == 0.0  # listing everything doesn't score
    assert case.score(f"{a} {a} {a}") == pytest.approx(1 / 3)


def test_passkey_still_builds_and_checks() -> None:
    case = passkey(lambda s: s.split(), 500, 0.5, 71432)
    assert case.correct("The pass key is 71432.") and not case.correct("71433")
    assert 450 <= case.n_tokens <= 550 and not case.rendered


def test_engine_gives_real_token_counts_and_its_chat_template(tiny) -> None:
    for case in (needle(tiny, 1500, 0.5, 0), needle_multiturn(tiny, 1500, 0.5, 0), cwe(tiny, 1500, 0)):
        assert case.n_tokens == len(tiny.prompt_tokens(case.prompt, False))
        assert 1450 <= case.n_tokens <= 1500
        assert case.prompt.startswith(tiny.model.apply_chat_template([{"role": "user", "content": "x"}])[:10])
