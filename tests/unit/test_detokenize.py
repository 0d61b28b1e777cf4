"""Incremental detokenization (no U+FFFD from split characters) and stop-string hold-back."""

from __future__ import annotations

from pathlib import Path

import pytest

from chatstream_asgi.engines.transformers.detokenizer import IncrementalDetokenizer, StopMatcher

JAPANESE = "こんにちは、世界!日本語のテキストです。"


class ByteTokenizer:
    """A fake tokenizer whose tokens are single UTF-8 bytes (the worst case for splitting)."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode())

    def batch_decode(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [bytes(ids).decode(errors="replace") for ids in batch]


def _stream(detokenizer: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    return [detokenizer.step(t) for t in ids]


def test_split_characters_never_emit_replacement_character() -> None:
    tokenizer = ByteTokenizer()
    deltas = _stream(IncrementalDetokenizer(tokenizer), tokenizer.encode(JAPANESE))
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == JAPANESE
    # Three bytes per character: two of every three steps wait.
    assert deltas[:3] == ["", "", "こ"]


def test_japanese_round_trip_with_byte_level_bpe(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids = tokenizer.encode(JAPANESE, add_special_tokens=False)
    assert len(ids) > len(JAPANESE)  # really split across tokens
    prompt = tokenizer.encode("Hello world", add_special_tokens=False)
    deltas = _stream(IncrementalDetokenizer(tokenizer, prompt), ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == JAPANESE


def test_invalid_bytes_are_released_eventually() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    deltas = _stream(detokenizer, [0xE3, 0x81])  # an unfinished character
    assert deltas == ["", ""]
    assert detokenizer.flush() == "\ufffd"


def test_decoding_window_stays_short() -> None:
    detokenizer = IncrementalDetokenizer(ByteTokenizer())
    _stream(detokenizer, list(b"a" * 500))
    _, full = detokenizer.windows()
    assert len(full) <= 2


@pytest.mark.parametrize(
    ("pieces", "stop", "emitted", "stopped"),
    [
        (["Hel", "lo", " ST", "O", "P", " after"], ["STOP"], "Hello ", True),
        (["a S", "T", "x", "y"], ["STOP"], "a STxy", False),
        (["abc</", "s>def"], ["</s>"], "abc", True),
        (["one\n\nUser:", " hi"], ["User:", "\n\n"], "one", True),
        (["x", "ENDEND"], ["END"], "x", True),
        (["no stops here"], [], "no stops here", False),
    ],
)
def test_stop_matcher_never_leaks_part_of_a_stop_string(
    pieces: list[str], stop: list[str], emitted: str, stopped: bool
) -> None:
    matcher = StopMatcher(stop)
    out = []
    for piece in pieces:
        delta = matcher.feed(piece)
        out.append(delta)
        for s in stop:  # no delta may end with the start of a stop string that later completes
            assert s not in delta
    out.append(matcher.flush())
    assert "".join(out) == emitted
    assert matcher.stopped is stopped


def test_stop_matcher_holds_back_only_a_possible_prefix() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abc S") == "abc "
    assert matcher.feed("TO") == ""
    assert matcher.feed("X") == "STOX"


def test_stop_matcher_over_a_fake_token_stream() -> None:
    tokenizer = ByteTokenizer()
    detokenizer = IncrementalDetokenizer(tokenizer)
    matcher = StopMatcher(["世界"])
    out = [matcher.feed(detokenizer.step(t)) for t in tokenizer.encode("こんにちは、世界!")]
    assert "".join(out) == "こんにちは、"
    assert matcher.stopped
