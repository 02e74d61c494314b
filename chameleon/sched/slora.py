"""`slora-exact`: FIFO admission as S-LoRA's router does it (the baseline, read from its source).

S-LoRA (`slora/server/router/manager.py`, `req_queue.py`), rule by rule (sources in
`docs/scheduling.md`, S-LoRA-exact admission):
- cadence: with requests running, new ones join only after `slora_max_wait_tokens` (10) decode
  steps since the last admission; with nothing running, at once;
- whole prompts: a new request's prompt is prefilled in one iteration, never chunked
  (`Scheduler` honours `whole_prompts`); the new prompts share S-LoRA's default
  `batch_max_tokens` = max(KV pool / 6, max_model_len) (`prefill_token_budget`);
- reservation: a request joins only if the peak KV of the running requests and the new ones, each
  reserved for its prompt + full `max_tokens` output, fits the KV pool less the batch's adapters
  (S-LoRA's `_can_add_new_req`, 4r slots for a rank-r adapter);
- stop at the first request that does not fit (FIFO head-of-line blocking).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from chameleon.sched.fifo import FifoPolicy
from chameleon.sched.options import SchedulerOptions
from chameleon.sched.policy import IndexWalk
from chameleon.sched.request import Request

__all__ = ["SLoRAPolicy", "peak_reserved_tokens"]


def peak_reserved_tokens(lengths: list[tuple[int, int]]) -> int:
    """S-LoRA's `need_max_token_num`: (tokens held now, tokens still to come) per request; sorted by
    what is to come, descending, the KV peak is max over k of cum_held[k] + to_come[k] * (k + 1)."""
    peak, held = 0, 0
    for k, (now, left) in enumerate(sorted(lengths, key=lambda x: -x[1])):
        held += now
        peak = max(peak, held + left * (k + 1))
    return peak


class _ReservingWalk(IndexWalk):
    """The FIFO queue head-first, ended at the first request the reservation cannot take."""

    def __init__(self, policy: SLoRAPolicy, open_: bool) -> None:
        super().__init__(policy, policy.queue)
        self._slora, self._open = policy, open_

    def next(self) -> Request | None:
        if not self._open:
            return None
        request = super().next()
        if request is not None and self._slora.options.slora_reserve_output and not self._slora.fits(request):
            self._open = False
            self._offered = None
            return None
        return request


class SLoRAPolicy(FifoPolicy):
    """FIFO with S-LoRA's admission cadence, whole prompts and full-output reservation."""

    def __init__(self, options: SchedulerOptions | None = None) -> None:
        super().__init__()
        self.options = options or SchedulerOptions()
        self.whole_prompts = self.options.slora_whole_prompt
        self._steps_since_admission = 0

    @property
    def queue(self) -> deque[Request]:
        return self._queue

    def walk(self, now: float) -> _ReservingWalk:  # type: ignore[override]
        due = not self.view.running or self._steps_since_admission >= self.options.slora_max_wait_tokens
        return _ReservingWalk(self, due)

    @property
    def prefill_token_budget(self) -> int:
        """S-LoRA's default `batch_max_tokens`: max(1/6 of the KV pool, the longest request)."""
        return max(self.view.kv_capacity_tokens // 6, self.view.max_model_len)

    def admitted(self, request: Request, now: float) -> None:
        super().admitted(request, now)
        self._steps_since_admission = 0

    def on_iteration(self, scheduled: Sequence[Request], duration_s: float, now: float) -> None:
        self._steps_since_admission += 1

    def fits(self, request: Request) -> bool:
        """S-LoRA's `_can_add_new_req` for the running requests plus `request` (module docstring)."""
        view = self.view
        lengths = [(len(r.prompt_token_ids) + len(r.output_token_ids), _left(r)) for r in view.running]
        lengths.append((len(request.prompt_token_ids) + 1, max(0, request.sampling.max_tokens - 1)))
        adapters = {r.adapter for r in view.running if r.adapter is not None}
        if request.adapter is not None:
            adapters.add(request.adapter)
        pool = view.kv_capacity_tokens - sum(view.adapter_token_cost(a) for a in adapters)
        return peak_reserved_tokens(lengths) < pool


def _left(request: Request) -> int:
    return max(0, request.sampling.max_tokens - len(request.output_token_ids) - 1)
