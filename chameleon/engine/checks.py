"""What a request must satisfy before it reaches the scheduler, and how its outputs are shaped.

Pure functions over values (no core state), so the core and the async front end raise the same
typed errors for the same input, and the core module stays about the iteration.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from chameleon.errors import (
    AdapterNotFoundError,
    AdapterQuarantinedError,
    InvalidRequestError,
    PromptTooLongError,
    RequestMemoryError,
)
from chameleon.memory.budget import MemoryBudget
from chameleon.outputs import AdapterInfo
from chameleon.sampling_params import SamplingParams

OUTPUT_KINDS = ("delta", "cumulative", "final")


def check_request_id(request_id: object) -> str:
    if not isinstance(request_id, str) or not request_id:
        raise InvalidRequestError(f"request_id must be a non-empty string, got {request_id!r:.80}")
    return request_id


def check_adapter_usable(adapter: object, adapters: Mapping[str, AdapterInfo]) -> None:
    """None, or the name of a registered adapter that is not quarantined."""
    if adapter is None:
        return
    if not isinstance(adapter, str):
        raise InvalidRequestError(f"adapter must be a string name or None, got {type(adapter).__name__}")
    info = adapters.get(adapter)
    if info is None:
        raise AdapterNotFoundError(f"no adapter named {adapter!r} is registered (known: {sorted(adapters)})")
    if info.broken:
        raise AdapterQuarantinedError(
            f"adapter {adapter!r} is quarantined after a failed load ({info.error}); remove and re-add it"
        )


def prompt_list(request_id: str, prompt_token_ids: object, vocab_size: int) -> list[int]:
    """The prompt as a list of in-vocabulary ints; bytes, sets, dicts, bools, floats refused."""
    if isinstance(prompt_token_ids, str | bytes | bytearray | memoryview) or not isinstance(prompt_token_ids, Sequence):
        raise InvalidRequestError(
            f"request {request_id!r}: prompt token ids must be a list or tuple of ints, "
            f"got {type(prompt_token_ids).__name__}"
        )
    prompt = list(prompt_token_ids)
    if not prompt:
        raise InvalidRequestError(f"request {request_id!r}: the prompt is empty")
    bad = [t for t in prompt if type(t) is not int or not 0 <= t < vocab_size]  # bools are not token ids
    if bad:
        raise InvalidRequestError(
            f"request {request_id!r}: token ids must be ints in [0, {vocab_size}): {bad[:5]!r:.200}"
        )
    return prompt


def check_fits(request_id: str, prompt_len: int, sampling: SamplingParams | None, max_model_len: int) -> None:
    """The prompt leaves room to generate, and prompt + `max_tokens` fits in `max_model_len`."""
    if prompt_len >= max_model_len:
        raise PromptTooLongError(
            f"request {request_id!r}: prompt has {prompt_len} tokens; max_model_len is "
            f"{max_model_len}, which leaves no room to generate"
        )
    if sampling is not None and prompt_len + sampling.max_tokens > max_model_len:
        raise PromptTooLongError(
            f"request {request_id!r}: prompt ({prompt_len} tokens) + max_tokens ({sampling.max_tokens}) "
            f"exceeds max_model_len ({max_model_len})"
        )


def check_memory(
    request_id: str,
    adapter: str | None,
    kv_blocks: int,
    adapter_rows: int,
    pinned_rows: int,
    memory: MemoryBudget,
    num_blocks: int,
) -> None:
    """The request's KV at its peak (`kv_blocks`, at most the `num_blocks` of the KV cache), its
    adapter's rows and the pinned adapters' rows fit in the budget at once; otherwise it could
    never run, even alone, and would wait forever."""
    kv = kv_blocks * memory.kv_block_bytes
    rows = (adapter_rows + pinned_rows) * memory.adapter_row_bytes
    usable = memory.usable_bytes
    if kv_blocks > num_blocks:
        raise RequestMemoryError(
            f"request {request_id!r} needs {kv_blocks} KV blocks at prompt + max_tokens; the KV cache has {num_blocks}"
        )
    if kv + rows <= usable:
        return
    who = f"adapter {adapter!r} ({adapter_rows} rank rows)" if adapter is not None else "the base model"
    pinned = f" and {pinned_rows} rows of pinned adapters" if pinned_rows else ""
    raise RequestMemoryError(
        f"request {request_id!r} can never fit in device memory: its KV at prompt + max_tokens is {kv_blocks} "
        f"blocks ({kv} bytes), next to {who}{pinned} ({rows} bytes), and the budget holds {usable} bytes after "
        "the reserve; lower max_tokens or the prompt, or raise device_memory_bytes / num_kv_blocks"
    )


def output_kind(sampling: SamplingParams) -> str:
    """`SamplingParams.output_kind` ("delta" when the field is absent or unknown).

    delta: each output carries the new text and ids; `text` is "" except on the finished output,
    which carries the whole text. cumulative: `text` and `token_ids` are everything so far.
    final: one output, when the request finishes, with the whole text and every id.
    """
    kind = getattr(sampling, "output_kind", "delta")
    kind = getattr(kind, "value", kind)  # an enum member
    return kind if kind in OUTPUT_KINDS else "delta"


def try_load(load: Callable[[str, int], None], name: str, row: int, failed: dict[str, str]) -> None:
    """Run an adapter load; a failure is recorded against the adapter instead of raised."""
    if name in failed:
        return
    try:
        load(name, row)
    except Exception as exc:  # any load failure is this adapter's: it gets quarantined
        failed[name] = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
