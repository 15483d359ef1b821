"""edgekif.decoding: search options (greedy by default), and the answer's text as it grows:
whole UTF-8 characters only, pieces that join to the answer, nothing past a stop string."""

from __future__ import annotations

import pytest

from edgekif.decoding import REPLACEMENT, DecodingError, Sampling, TextStream, decode_answer

TEXT = "héllo 😀 中文 ok"
BYTES = list(TEXT.encode("utf-8"))  # a byte-level tokenizer: one token per byte


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def pieces(stream: TextStream, ids: list[int]) -> list[str]:
    out = [stream.push(t) for t in ids]
    out.append(stream.finish())
    return out


def test_pieces_are_whole_characters_and_join_to_the_answer():
    s = TextStream(byte_decode)
    got = pieces(s, BYTES)
    assert "".join(got) == TEXT == s.text
    assert not any(REPLACEMENT in p for p in got)
    assert got[BYTES.index(0xF0)] == ""  # the emoji's first byte: held back until its fourth


@pytest.mark.parametrize("n", range(1, len(BYTES) + 1))
def test_a_cut_at_any_token_drops_the_partial_character(n):
    s = TextStream(byte_decode)
    got = pieces(s, BYTES[:n])
    whole = bytes(BYTES[:n]).decode("utf-8", errors="ignore")
    assert "".join(got) == s.text == whole == decode_answer(byte_decode, BYTES[:n])
    assert REPLACEMENT not in s.text


def test_stop_strings_cut_the_answer_and_nothing_past_them_is_emitted():
    ids = list("The answer: 42\nEND more".encode())
    s = TextStream(byte_decode, stops=["\nEND"])
    out = []
    for t in ids:
        out.append(s.push(t))
        if s.stopped:
            break
    out.append(s.finish())
    assert "".join(out) == s.text == "The answer: 42" and s.stopped
    assert len(s.ids) == len("The answer: 42\nEND")  # generation stops at the stop string
    # a partial stop that never completes is emitted at the end
    s = TextStream(byte_decode, stops=["\nEND"])
    assert "".join(pieces(s, list("ab\nEN".encode()))) == "ab\nEN" and not s.stopped
    # held back meanwhile: a stream never shows the start of a stop before it is known
    s = TextStream(byte_decode, stops=["XY"])
    assert [s.push(t) for t in b"aX"] == ["a", ""]


def test_sampling_maps_to_onnxruntime_genai_search_options():
    assert Sampling().search_options() == {"do_sample": False, "repetition_penalty": 1.0}
    assert Sampling(top_p=0.5, seed=3).search_options()["do_sample"] is False  # greedy: the argmax is in every nucleus
    opts = Sampling(temperature=0.7, top_p=0.9, top_k=40, seed=1, repetition_penalty=1.1).search_options(vocab_size=100)
    assert opts == {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 40, "random_seed": 1, "repetition_penalty": 1.1}
    assert "random_seed" not in Sampling(temperature=1.0).search_options()
    with pytest.raises(DecodingError) as e:
        Sampling(temperature=1.0, top_k=500).search_options(vocab_size=259)
    assert e.value.param == "top_k"
