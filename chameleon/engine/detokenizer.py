"""Incremental detokenization: generated token ids -> streamable text, UTF-8 safe, with stop strings.

Two layers:

* `_TokenWindow` turns token ids into *settled* text. It decodes only a short window of recent tokens
  (prefix/read offsets): the text of the new tokens is ``decode(window + new) - decode(window)``. Both decodes
  start at the same token, so tokenizers that strip the leading space of the first token (SentencePiece "▁")
  strip it in both and the difference keeps the space. Text ending in U+FFFD is an unfinished multi-byte
  character (byte-level BPE splits emoji / CJK across tokens) and is held until a later token completes it.
* `IncrementalDetokenizer` adds stop strings and the hold-back that keeps a possible stop prefix unreleased.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
from transformers import PreTrainedTokenizerBase

from chameleon.errors import InvalidSamplingParamsError

_REPLACEMENT = "\ufffd"
# Prompt tokens decoded as left context, so the first generated token keeps its leading space.
_PROMPT_CONTEXT = 5
# Tokens held (text still ending in U+FFFD) before looking for a settled boundary. A UTF-8 character is at
# most 4 bytes, so a legitimately split character never holds this many.
_MAX_PENDING = 8
# Consumed ids are dropped once this many pile up, keeping memory O(window) too.
_TRIM_AT = 256
# An unfinished UTF-8 character is at most 3 bytes, and every token carries at least one byte.
_MAX_UNFINISHED_TOKENS = 3


@attrs.frozen
class DetokenizerUpdate:
    delta: str  # new text safe to stream now (may be "")
    stop_hit: str | None = None  # the stop string that matched; the request must finish with reason "stop"


@attrs.define
class IncrementalDetokenizer:
    """Per-request detokenizer. Feed generated ids with `add_tokens`; call `finish` on any other finish."""

    _window: _TokenWindow
    _stops: tuple[str, ...]
    _include_stop: bool
    _hold: int  # chars kept back: a longer tail could be the start of a stop string
    _pending: str = ""  # settled text not yet released (at most `_hold` chars between calls)
    _released: list[str] = attrs.field(factory=list)
    _stop_hit: str | None = None
    _finished: bool = False

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompt_token_ids: Sequence[int],
        *,
        stop: Sequence[str] = (),
        include_stop_str_in_output: bool = False,
        skip_special_tokens: bool = True,
    ) -> None:
        stops = _normalize_stops(stop)
        window = _TokenWindow.create(tokenizer, prompt_token_ids, skip_special_tokens)
        hold = max((len(s) for s in stops), default=1) - 1
        self.__attrs_init__(window, stops, include_stop_str_in_output, hold)  # type: ignore[attr-defined]

    @property
    def text(self) -> str:
        """All text released so far (what the user has seen)."""
        if len(self._released) > 1:  # join lazily; deltas are the cheap streaming path
            self._released[:] = ["".join(self._released)]
        return self._released[0] if self._released else ""

    @property
    def stop_hit(self) -> str | None:
        """The stop string that ended the output, if any (also set when `finish` found one)."""
        return self._stop_hit

    @property
    def finished(self) -> bool:
        return self._finished

    def add_tokens(self, token_ids: Sequence[int]) -> DetokenizerUpdate:
        """Feed newly generated ids. Ids arriving after a stop hit or `finish` are ignored."""
        if self._finished:
            return DetokenizerUpdate("")
        return self._release(self._window.push(token_ids), final=False)

    def finish(self) -> str:
        """Release everything still held: text kept back for stop matching and any unfinished bytes."""
        if self._finished:
            return ""
        update = self._release(self._window.flush(), final=True)
        self._finished = True
        return update.delta

    def _release(self, new_text: str, *, final: bool) -> DetokenizerUpdate:
        buffer = self._pending + new_text
        match = self._find_stop(buffer, len(self._pending))
        if match is not None:
            index, stop = match
            end = index + len(stop) if self._include_stop else index
            self._pending, self._stop_hit, self._finished = "", stop, True
            return self._emit(buffer[:end], stop)
        cut = len(buffer) if final else max(0, len(buffer) - self._hold)
        self._pending = buffer[cut:]
        return self._emit(buffer[:cut], None)

    def _emit(self, delta: str, stop: str | None) -> DetokenizerUpdate:
        if delta:
            self._released.append(delta)
        return DetokenizerUpdate(delta, stop)

    def _find_stop(self, buffer: str, old_len: int) -> tuple[int, str] | None:
        """Earliest stop match that ends in the new text; ties go to the shorter stop (it completes first)."""
        best: tuple[int, int, str] | None = None
        for stop in self._stops:
            # Matches ending inside old text were already searched, so start just far enough back.
            index = buffer.find(stop, max(0, old_len - len(stop) + 1))
            if index >= 0 and (best is None or (index, len(stop)) < best[:2]):
                best = (index, len(stop), stop)
        return None if best is None else (best[0], best[2])


def _normalize_stops(stop: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(stop, str):  # a bare str is a Sequence[str] of characters; treat it as one stop
        stop = (stop,)
    if any(not isinstance(s, str) or not s for s in stop):
        raise InvalidSamplingParamsError(f"stop strings must be non-empty str, got {list(stop)!r}")
    return tuple(dict.fromkeys(stop))


@attrs.define
class _TokenWindow:
    """Token ids -> settled text, decoding only the window ``ids[prefix:]``.

    ``ids[prefix:read]`` is context whose text was already returned; ``ids[read:]`` is not yet returned.
    """

    _tokenizer: PreTrainedTokenizerBase
    _skip_special: bool
    _skipped_ids: frozenset[int]
    _ids: list[int]
    _prefix: int
    _read: int
    _check_at: int  # len(_ids) at which a stalled window looks for a settled boundary
    _backend: Any = None  # the Rust tokenizer to decode with directly (see _backend_decoder), or None

    @classmethod
    def create(
        cls, tokenizer: PreTrainedTokenizerBase, prompt_ids: Sequence[int], skip_special: bool
    ) -> _TokenWindow:
        skipped = _skipped_ids(tokenizer) if skip_special else frozenset()
        window = cls(tokenizer, skip_special, skipped, [], 0, 0, _MAX_PENDING, _backend_decoder(tokenizer))
        window._ids = window._context(prompt_ids)
        window._read = len(window._ids)
        window._check_at = window._read + _MAX_PENDING
        return window

    def push(self, token_ids: Iterable[int]) -> str:
        """Add ids; return the text that became settled."""
        self._ids.extend(self._filter(token_ids))
        end = len(self._ids)
        if end == self._read:
            return ""
        prefix_text = self._decode(self._prefix, self._read)
        full = self._decode(self._prefix, end)
        # No growth (a token with no text) keeps the old context: advancing would start the window at a
        # token whose leading space the decoder might strip.
        if len(full) > len(prefix_text) and not full.endswith(_REPLACEMENT):
            return self._advance(prefix_text, full, end)
        if end >= self._check_at:
            return self._release_settled(prefix_text, full)
        return ""

    def flush(self) -> str:
        """Return the text of all held tokens as the tokenizer decodes it, U+FFFD included."""
        end = len(self._ids)
        if end == self._read:
            return ""
        prefix_text = self._decode(self._prefix, self._read)
        full = self._decode(self._prefix, end)
        self._prefix = self._read = end
        return full[len(prefix_text) :]

    def _release_settled(self, prefix_text: str, full: str) -> str:
        """Stalled on U+FFFD for many tokens (invalid bytes or literal U+FFFD): release up to a settled
        token boundary so the window stays bounded. Runs once per `_MAX_PENDING` stalled tokens."""
        end = len(self._ids)
        texts = {k: self._decode(self._prefix, k) for k in range(self._read + 1, end)}
        texts[end] = full
        stable = len(full.rstrip(_REPLACEMENT))
        for k in range(end - 1, self._read, -1):
            # Only the last few tokens can hold an unfinished character, unless the text precedes the U+FFFD tail.
            settled = k <= end - _MAX_UNFINISHED_TOKENS or len(texts[k]) <= stable
            # Every later decode must extend it: ByteFallback decoders turn a whole run of byte tokens into
            # U+FFFD while its last character is unfinished, so a U+FFFD-only text can still become real text.
            extended = all(texts[j].startswith(texts[k]) for j in range(k + 1, end + 1))
            if settled and extended and len(texts[k]) > len(prefix_text):
                return self._advance(prefix_text, texts[k], k)
        self._check_at = end + _MAX_PENDING
        return ""

    def _advance(self, prefix_text: str, text: str, new_read: int) -> str:
        """Return the text past `prefix_text`; the just-returned tokens become the next window's context."""
        self._prefix, self._read = self._read, new_read
        self._check_at = new_read + _MAX_PENDING
        if self._prefix >= _TRIM_AT:
            del self._ids[: self._prefix]
            self._read -= self._prefix
            self._check_at -= self._prefix
            self._prefix = 0
        return text[len(prefix_text) :]

    def _context(self, prompt_ids: Sequence[int]) -> list[int]:
        """Prompt tail used as left context, trimmed so it does not end inside an unfinished character
        (its text would not be a prefix of the text with the generated tokens appended)."""
        context: list[int] = []
        for token_id in reversed(prompt_ids):  # scan back: a chat template often ends in skipped specials
            if len(context) == _PROMPT_CONTEXT:
                break
            context.extend(self._filter((token_id,)))
        context.reverse()
        while context and self._decode_ids(context).endswith(_REPLACEMENT):
            context.pop()
        return context

    def _filter(self, token_ids: Iterable[int]) -> list[int]:
        # Skipped special tokens never enter the window: they have no text and would only widen it.
        return [i for i in map(int, token_ids) if i not in self._skipped_ids]  # int(): numpy / torch scalars

    def _decode(self, start: int, stop: int) -> str:
        return self._decode_ids(self._ids[start:stop])

    def _decode_ids(self, ids: list[int]) -> str:
        # No clean-up: it rewrites spaces across token boundaries, so window decodes would not add up.
        if self._backend is not None:
            return str(self._backend.decode(ids, skip_special_tokens=self._skip_special))
        return str(self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        ))


_SKIPPED_IDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, frozenset[int]] = (
    weakref.WeakKeyDictionary()
)


_BACKENDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, Any] = weakref.WeakKeyDictionary()


def _backend_decoder(tokenizer: PreTrainedTokenizerBase) -> Any | None:
    """The Rust `tokenizers.Tokenizer` behind a fast tokenizer whose decode nothing overrides (its
    class, the instance), else None. Without clean-up, transformers' decode is exactly the backend's; calling it
    directly skips ~8 us of Python argument handling per call (two calls per generated token)."""
    if "decode" in vars(tokenizer):  # decode replaced on this instance (a wrapper, a spy): keep it
        return None
    if tokenizer in _BACKENDS:
        return _BACKENDS[tokenizer]
    backend = None
    fast: Any = None
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend

        fast = TokenizersBackend
    except ImportError:  # another transformers layout: keep its decode
        pass
    cls = type(tokenizer)
    if (
        fast is not None
        and isinstance(tokenizer, fast)
        and cls.decode is PreTrainedTokenizerBase.decode
        and cls._decode is fast._decode
    ):
        backend = getattr(tokenizer, "_tokenizer", None)
    _BACKENDS[tokenizer] = backend
    return backend


def _skipped_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """Ids that `decode(..., skip_special_tokens=True)` drops, computed once per tokenizer."""
    cached = _SKIPPED_IDS.get(tokenizer)
    if cached is None:
        candidates = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        # Test decode itself rather than trusting flags: backends differ on what "special" means.
        cached = frozenset(
            i
            for i in candidates
            if tokenizer.decode([i], skip_special_tokens=False) != ""
            and tokenizer.decode([i], skip_special_tokens=True) == ""
        )
        _SKIPPED_IDS[tokenizer] = cached
    return cached
