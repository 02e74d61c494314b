"""Request sizes for MLQ: the paper's weighted request size (WRS) and the quota cost in tokens.

Rules and their reasons: `docs/scheduling.md` (Sizing).
"""

from __future__ import annotations


def adapter_factor(adapter_size: float | None, *, max_adapter: float | None, min_adapter: float | None = None) -> float:
    """`adapter_size / max_adapter`; base-model requests (None) use `min_adapter` (module docstring)."""
    if max_adapter is None:  # no adapter registered: sizes reduce to the length terms
        if adapter_size is not None:
            raise ValueError("an adapter request needs max_adapter")
        return 1.0
    if not max_adapter > 0:
        raise ValueError(f"max_adapter must be > 0, got {max_adapter!r}")
    if adapter_size is None:
        if min_adapter is None:
            raise ValueError("sizing a base-model request needs min_adapter (the smallest adapter's size)")
        adapter_size = min_adapter
    if not adapter_size > 0:
        raise ValueError(f"adapter sizes must be > 0, got {adapter_size!r}")
    return adapter_size / max_adapter


def weighted_request_size(
    input_len: float,
    pred_output_len: float,
    adapter_rank_or_bytes: float | None,
    *,
    max_input: float,
    max_output: float,
    max_adapter: float | None,
    min_adapter: float | None = None,
    input_weight: float = 0.4,
    output_weight: float = 0.6,
) -> float:
    """The paper's WRS: `(0.4 in/max_in + 0.6 out/max_out) * adapter/max_adapter` (module docstring)."""
    if input_len < 0 or pred_output_len < 0:
        raise ValueError("lengths must be >= 0")
    if not (max_input > 0 and max_output > 0):
        raise ValueError("max_input and max_output must be > 0")
    length = input_weight * input_len / max_input + output_weight * pred_output_len / max_output
    return length * adapter_factor(adapter_rank_or_bytes, max_adapter=max_adapter, min_adapter=min_adapter)


def request_tokens(input_len: int, pred_output_len: int, adapter_bytes: int = 0, *, kv_bytes_per_token: int) -> int:
    """A request's quota cost: input + predicted output + adapter memory in KV-token equivalents.

    Pass `adapter_bytes=0` when the adapter's memory should not be charged (e.g. already resident).
    """
    if kv_bytes_per_token < 1:
        raise ValueError(f"kv_bytes_per_token must be >= 1, got {kv_bytes_per_token!r}")
    if min(input_len, pred_output_len, adapter_bytes) < 0:
        raise ValueError("token counts and bytes must be >= 0")
    return input_len + pred_output_len + -(-adapter_bytes // kv_bytes_per_token)  # ceil division
