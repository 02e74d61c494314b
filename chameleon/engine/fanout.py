"""`SamplingParams.n > 1`: one request as n child requests, and their outputs as one stream.

The core gives each completion i its own child `Request` (id `f"{i}_{request_id}"`, as vLLM V1
names them), so scheduling, KV, preemption and sampling need nothing new: each child has its own
seed (`seed + i`, or one from the engine's seed stream) and its own generator.

Sharing the prompt's prefill: with prefix caching on (`EngineConfig.enable_prefix_caching`),
children 1..n-1 are held back until child 0 has computed the prompt; its full prompt blocks are
then in the prefix cache, and the others attach them and compute only the last partial block.
Without prefix caching every child computes its own prefill (batched in the same iterations):
correct, with no sharing. Child 0 alone asks for prompt logprobs (a request that asks for them
never attaches cached blocks, so its siblings still can).

Outputs (vLLM's convention): delta and cumulative updates carry the completions that changed in
an iteration, final carries all n at the end; `finished` once every child has finished. If one
child fails, its siblings are aborted and the request ends with that error.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from chameleon.engine.checks import output_kind
from chameleon.outputs import CompletionOutput, PositionLogprobs, RequestMetrics, RequestOutput, merge_completions
from chameleon.sampling_params import SamplingParams
from chameleon.sched.request import Request

SEED_MOD = 2**63


def child_id(request_id: str, index: int) -> str:
    return f"{index}_{request_id}"


def ids_of(request_id: str, n: int) -> list[str]:
    """The ids a request occupies: its own, and with n > 1 its children's too."""
    return [request_id, *(child_id(request_id, i) for i in range(n))] if n > 1 else [request_id]


def child_sampling(sampling: SamplingParams, index: int) -> SamplingParams:
    """Completion `index`'s parameters: n=1, seed `seed + index`, prompt logprobs on child 0 only."""
    seed = None if sampling.seed is None else (sampling.seed + index) % SEED_MOD
    prompt_logprobs = sampling.prompt_logprobs if index == 0 else None
    return attrs.evolve(sampling, n=1, seed=seed, prompt_logprobs=prompt_logprobs)


@attrs.define(eq=False)
class Parent:
    request_id: str
    sampling: SamplingParams
    arrival_time: float
    child_ids: tuple[str, ...]
    held: list[Request]  # children waiting for child 0's prefill (prefix caching only)
    done: dict[int, CompletionOutput] = attrs.field(factory=dict)  # finished children's last output
    metrics: dict[int, RequestMetrics] = attrs.field(factory=dict)
    error: str | None = None

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.child_ids)

    def aggregate_metrics(self) -> RequestMetrics:
        ms = list(self.metrics.values())

        def first(values: list[float | None]) -> float | None:
            known = [v for v in values if v is not None]
            return min(known) if known else None

        finish = [m.finish_time for m in ms]
        return RequestMetrics(
            arrival_time=self.arrival_time,
            first_scheduled_time=first([m.first_scheduled_time for m in ms]),
            first_token_time=first([m.first_token_time for m in ms]),
            finish_time=max(f for f in finish if f is not None) if self.finished and None not in finish else None,
            num_prompt_tokens=max((m.num_prompt_tokens for m in ms), default=0),
            num_generated_tokens=sum(m.num_generated_tokens for m in ms),
        )


class Fanout:
    """The core's parents (requests with n > 1) and the map from child ids to them."""

    def __init__(self) -> None:
        self.parents: dict[str, Parent] = {}
        self._child: dict[str, tuple[Parent, int]] = {}

    def __contains__(self, request_id: object) -> bool:
        return request_id in self.parents

    def is_child(self, request_id: str) -> bool:
        return request_id in self._child

    def add(self, parent: Parent) -> None:
        self.parents[parent.request_id] = parent
        for i, cid in enumerate(parent.child_ids):
            self._child[cid] = (parent, i)

    def has_held(self) -> bool:
        return any(p.held for p in self.parents.values())

    def public_ids(self, ids: list[str]) -> list[str]:
        """Request ids as callers know them: children replaced by their parent, in order."""
        out: dict[str, None] = {}
        for rid in ids:
            hit = self._child.get(rid)
            out[hit[0].request_id if hit else rid] = None
        for parent_id in self.parents:  # parents whose children are all held still exist
            out[parent_id] = None
        return list(out)

    def ready(self, live: Callable[[str], Request | None]) -> list[Request]:
        """Held children to admit now: child 0 has computed its prompt, or is gone."""
        out: list[Request] = []
        for p in self.parents.values():
            if not p.held:
                continue
            first = live(p.child_ids[0])
            if first is None or first.num_computed_tokens >= len(first.prompt_token_ids):
                out += p.held
                p.held = []
        return out

    def collect(self, outputs: list[RequestOutput], abort: Callable[[str], RequestOutput | None]) -> list[RequestOutput]:
        """Children's outputs as their parents' (one per parent per call); others pass through."""
        order: list[RequestOutput | str] = []
        groups: dict[str, list[tuple[int, RequestOutput]]] = {}
        for out in outputs:
            hit = self._child.get(out.request_id)
            if hit is None:
                order.append(out)
                continue
            parent_id = hit[0].request_id
            if parent_id not in groups:
                groups[parent_id] = []
                order.append(parent_id)
            groups[parent_id].append((hit[1], out))
        result: list[RequestOutput] = []
        for entry in order:
            if not isinstance(entry, str):
                result.append(entry)
            elif (merged := self._merge(self.parents[entry], groups[entry], abort)) is not None:
                result.append(merged)
        for parent in [p for p in self.parents.values() if p.finished]:
            self._forget(parent)
        return result

    def abort(self, parent_id: str, abort: Callable[[str], RequestOutput | None]) -> RequestOutput | None:
        """End every child of a parent; its final output."""
        parent = self.parents[parent_id]
        out = self._merge(parent, self._abort_children(parent, abort, set()), abort)
        self._forget(parent)
        return out

    def _abort_children(
        self, parent: Parent, abort: Callable[[str], RequestOutput | None], skip: set[int]
    ) -> list[tuple[int, RequestOutput]]:
        """Abort the children that have not finished (held ones are just dropped)."""
        held = {r.request_id for r in parent.held}
        parent.held = []
        items = []
        for i, cid in enumerate(parent.child_ids):
            if i in parent.done or i in skip:
                continue
            out = None if cid in held else abort(cid)
            if out is None:  # held (never admitted), or already gone
                out = RequestOutput(cid, "", (), "", True, "abort", RequestMetrics(parent.arrival_time))
            items.append((i, out))
        return items

    def _merge(
        self, parent: Parent, items: list[tuple[int, RequestOutput]], abort: Callable[[str], RequestOutput | None]
    ) -> RequestOutput | None:
        errors = [out.error for _, out in items if out.error is not None]
        if errors and parent.error is None:  # one child failed: the request fails as a whole
            parent.error = errors[0]
            items = items + self._abort_children(parent, abort, {i for i, o in items if o.finished})
        cumulative = output_kind(parent.sampling) == "cumulative"
        changed: dict[int, CompletionOutput] = {}
        prompt: tuple[PositionLogprobs | None, ...] | None = None
        for index, out in items:
            parent.metrics[index] = out.metrics
            completion = attrs.evolve(out.outputs[0], index=index) if out.outputs else CompletionOutput(index, "", ())
            if out.finished and completion.finish_reason is None:
                completion = attrs.evolve(completion, finish_reason=out.finish_reason or "abort")
            if index in changed:  # an update and then its abort, in one call
                completion = merge_completions(changed[index], completion, cumulative)
            changed[index] = completion
            if out.finished:
                parent.done[index] = completion
            prompt = prompt or out.prompt_logprobs
        if output_kind(parent.sampling) == "final":
            if not parent.finished:
                return None
            changed = parent.done
        outputs = tuple(changed[i] for i in sorted(changed))
        error = parent.error if parent.finished else None
        return RequestOutput.of(
            parent.request_id, outputs, parent.finished, parent.aggregate_metrics(), error=error, prompt_logprobs=prompt
        )

    def _forget(self, parent: Parent) -> None:
        self.parents.pop(parent.request_id, None)
        for cid in parent.child_ids:
            self._child.pop(cid, None)
