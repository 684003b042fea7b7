"""Streaming: text deltas with correct incremental UTF-8 detokenisation."""

from __future__ import annotations

from nextoken.plugins.hf_tokenizer import HFTokenizer as Tokenizer

TEXT = "Grüße, 世界! naïve café 🌍🚀 — done"


def _check_stream(tok: Tokenizer, context: list[int], ids: list[int]) -> list[str]:
    decoder = tok.decoder(context)
    deltas = [decoder.add(t) for t in ids]
    deltas.append(decoder.flush())
    for d in deltas:
        assert "\ufffd" not in d, f"half a character was emitted: {deltas}"
    expected = tok.decode(context + ids)[len(tok.decode(context)) :]
    assert "".join(deltas) == expected
    return deltas


def test_byte_tokenizer_splits_characters_and_deltas_hold_them(tiny_llama):
    tok = Tokenizer.from_file(tiny_llama[1] / "tokenizer.json")
    ids = tok.encode(TEXT)
    assert len(ids) > len(TEXT)  # multi-byte characters span several tokens
    deltas = _check_stream(tok, ids[:1], ids[1:])
    assert "".join(deltas) == TEXT
    assert "" in deltas  # some tokens completed no character yet


def test_byte_fallback_tokenizer_keeps_leading_spaces(stories_package):
    tok = Tokenizer.from_file(stories_package / "tokenizer.json")
    prompt = tok.encode("Once upon a time")
    rest = tok.encode("Once upon a time there was 🌍 and naïve Zoë in 東京.")[len(prompt) :]
    deltas = _check_stream(tok, prompt, rest)
    assert "".join(deltas).startswith(" there")


def test_unfinished_character_at_the_end_is_flushed(tiny_llama):
    tok = Tokenizer.from_file(tiny_llama[1] / "tokenizer.json")
    ids = tok.encode("ab🌍")[:-1]  # cut inside the 4-byte character
    decoder = tok.decoder(ids[:1])
    deltas = [decoder.add(t) for t in ids[1:]]
    assert "".join(deltas) == "ab"
    assert decoder.flush() == tok.decode(ids)[2:]


def test_engine_stream_concatenates_to_the_completion_text(llama_engine):
    prompts = ["Hello", "Streaming, per sequence"]
    generation = llama_engine.start(prompts, max_new_tokens=24, ignore_eos=True)
    texts = ["", ""]
    finished = {}
    for event in llama_engine.run(generation):
        texts[event.index] += event.text
        if event.finish_reason:
            finished[event.index] = event.finish_reason
    completions = generation.completions()
    assert finished == {0: "length", 1: "length"}
    assert [c.text for c in completions] == texts
    for prompt, c in zip(prompts, completions):
        ids = llama_engine.encode(prompt)
        assert c.text == llama_engine.tokenizer.decode(ids + c.token_ids)[len(llama_engine.tokenizer.decode(ids)) :]


def test_sequences_stop_on_their_own(llama_engine):
    """A sequence that hits a stop id ends; its neighbour in the batch goes on."""
    free = llama_engine.generate(["Hello", "Other prompt"], max_new_tokens=20, ignore_eos=True)
    stop_at = next(t for t in free[0].token_ids[2:] if t not in free[1].token_ids)
    got = llama_engine.generate(["Hello", "Other prompt"], max_new_tokens=20, stop_token_ids=(stop_at,))
    first = free[0].token_ids.index(stop_at)
    assert got[0].finish_reason == "stop" and got[0].token_ids == free[0].token_ids[: first + 1]
    assert got[1].finish_reason == "length" and got[1].token_ids == free[1].token_ids


def test_stop_string_holdback():
    from nextoken.plugins.stopping import StopStrings

    stops = StopStrings(("THE END", "xyz"))
    assert stops.holdback("story. THE EN") == 6
    assert stops.holdback("story. T") == 1
    assert stops.holdback("story xy") == 2
    assert stops.holdback("story.") == 0
    assert stops.holdback("") == 0
    assert stops.holdback("THE ENDING") == 0
