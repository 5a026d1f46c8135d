"""Incremental output handling: UTF-8 across tokens, stop strings across tokens, thinking blocks."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ktulhu.engine.output import OutputFilter, StopMatcher, ThinkFilter, Utf8Decoder


def chunks_of(data, cuts: list[int]):
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in zip(points, points[1:])]


@given(text=st.text(), cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_utf8_split_anywhere_gives_the_same_text(text: str, cuts: list[int]) -> None:
    decoder = Utf8Decoder()
    data = text.encode()
    out = "".join(decoder.feed(part) for part in chunks_of(data, cuts)) + decoder.flush()
    assert out == text


def test_utf8_split_inside_emoji_and_cyrillic_waits_for_the_rest() -> None:
    decoder = Utf8Decoder()
    data = "Привет 👋".encode()
    assert decoder.feed(data[:1]) == ""  # half of П
    assert decoder.feed(data[1:12]) == "Привет"
    emoji = data[13:]
    assert decoder.feed(data[12:13] + emoji[:2]) == " "  # half an emoji waits
    assert decoder.feed(emoji[2:3]) == "" and decoder.feed(emoji[3:]) == "👋"


def test_invalid_bytes_become_replacement_characters() -> None:
    decoder = Utf8Decoder()
    assert decoder.feed(b"ok\xff") == "ok\ufffd"
    assert decoder.feed(b"\xd0") == "" and decoder.flush() == "\ufffd"


def run_stop(stops: tuple[str, ...], parts: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for part in parts:
        safe, stopped = matcher.feed(part)
        out.append(safe)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


@given(text=st.text(alphabet="ab\nXY", max_size=40), stop=st.text(alphabet="ab\nXY", min_size=1, max_size=4),
       cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_stop_strings_match_across_any_token_boundaries(text: str, stop: str, cuts: list[int]) -> None:
    out, stopped = run_stop((stop,), chunks_of(text, cuts))
    index = text.find(stop)
    if index >= 0:
        assert stopped and out == text[:index]
    else:
        assert not stopped and out == text


def test_earliest_of_several_stops_wins_and_held_text_is_released() -> None:
    assert run_stop(("END", "\n\n"), ["Hello\n", "\nEN", "D"]) == ("Hello", True)
    assert run_stop(("END",), ["abc E", "N", "x"]) == ("abc ENx", False)


@given(cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_think_blocks_are_removed_across_boundaries(cuts: list[int]) -> None:
    text = "<think>plan: greet</think>Hello [THINK]hmm[/THINK]world"
    think = ThinkFilter()
    out = "".join(think.feed(part) for part in chunks_of(text, cuts)) + think.flush()
    assert out == "Hello world"
    assert think.thinking_chars == len("plan: greet") + len("hmm")


def test_unclosed_think_block_hides_the_rest_and_lookalikes_pass() -> None:
    think = ThinkFilter()
    assert think.feed("a <thin") == "a "
    assert think.feed("king> b") == "<thinking> b"
    assert think.feed("<think>never closed") == "" and think.flush() == ""


def test_output_filter_stop_inside_visible_text_only() -> None:
    f = OutputFilter.create(("STOP",), include_thinking=False)
    assert f.feed(b"<think>STOP here is thinking</think>Hi ") == "Hi "
    assert f.feed(b"there STO") == "there " and not f.stopped
    assert f.feed(b"P and more") == "" and f.stopped
    assert f.finish() == ""


def test_output_filter_keeps_thinking_when_asked() -> None:
    f = OutputFilter.create((), include_thinking=True)
    assert f.feed("<think>x</think>y".encode()) + f.finish() == "<think>x</think>y"
