"""Streaming text deltas: held-back stop-string prefixes and incomplete UTF-8 never leak."""
from __future__ import annotations

from polarsparse.engine.engine import CompletionOutput
from polarsparse.serve.generation import DeltaTracker


def out(text: str, n_tokens: int, finish: str | None = None) -> CompletionOutput:
    return CompletionOutput(0, text, list(range(n_tokens)), finish)


def replay(tracker: DeltaTracker, states) -> str:
    sent = []
    for text, n, finish in states:
        d = tracker.advance(out(text, n, finish))
        if d is not None:
            sent.append(d.text)
    return "".join(sent)


def test_deltas_concatenate_to_the_final_text_and_carry_every_token_once():
    t = DeltaTracker(0, holdback=0)
    deltas = [t.advance(out(s, i + 1, "length" if i == 2 else None)) for i, s in enumerate(["He", "Hell", "Hello"])]
    assert [d.text for d in deltas] == ["He", "ll", "o"]
    assert [d.token_ids for d in deltas] == [[0], [1], [2]]
    assert [d.first for d in deltas] == [True, False, False]
    assert deltas[-1].finish_reason == "length"
    assert t.advance(out("Hello", 3, "length")) is None  # nothing after the end


def test_text_a_stop_string_removes_is_never_sent():
    # stop "END": the engine's final text drops it; the partial "EN" must not have been streamed
    t = DeltaTracker(0, holdback=len("END") - 1)
    streamed = replay(t, [("ab", 1, None), ("abEN", 2, None), ("ab", 3, "stop")])
    assert streamed == "ab"


def test_incomplete_utf8_waits_for_the_rest_of_the_character():
    t = DeltaTracker(0, holdback=0)
    d1 = t.advance(out("caf\ufffd", 1))
    assert d1.text == "caf"
    d2 = t.advance(out("café", 2))
    assert d2.text == "é"


def test_tokens_flow_even_while_text_is_held_back():
    t = DeltaTracker(0, holdback=5)
    d = t.advance(out("abc", 2))
    assert d.text == "" and d.token_ids == [0, 1]
    assert replay(t, [("abcdefgh", 3, "length")]) == "abcdefgh"
