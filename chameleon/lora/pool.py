"""Device-side adapter weights: one row pool per (layer, module), and the per-batch LoRA hook.

Rows come from `AdapterCache` (the policy); this file only copies weights in and builds the
segment metadata a batch needs. An adapter with per-module ranks (rank_pattern) occupies
`max_rank` rows; rows past a module's own rank stay zero, so they add nothing.

Modules that read the same input (q/k/v read the attention norm's output, gate/up the MLP norm's)
share one lora_A tensor `[rows, modules, in]`: each module's pool is a strided view of it, so an
adapter's A rows of the whole group are one contiguous `[rank * modules, in]` block and the
torch path shrinks the group with one matmul per segment instead of one per module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import attrs
import torch

from chameleon.lora.ops import Backend, LoRASegments, lora_apply
from chameleon.lora.peft_adapter import BaseModelSpec, LoRAAdapter
from chameleon.model.geometry import TARGET_MODULES

# (start, length, first pool row, rows, which of a group's modules the adapter targets)
GroupRun = tuple[int, int, int, int, tuple[bool, ...]]

# Modules fed the same activations, in the order the model passes their outputs.
SHARED_INPUT_GROUPS: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class LoRAPool:
    def __init__(self, base: BaseModelSpec, capacity_rows: int, *, device: torch.device, dtype: torch.dtype) -> None:
        self.base, self.capacity_rows = base, capacity_rows
        self.device, self.dtype = device, dtype
        self._a: list[dict[str, torch.Tensor]] = []
        self._b: list[dict[str, torch.Tensor]] = []
        self._a_groups: list[dict[tuple[str, ...], torch.Tensor]] = []  # group -> [rows, modules, in]
        self.resident: dict[str, tuple[int, LoRAAdapter]] = {}  # name -> (first row, adapter)
        # The last batch's hook, reused while the next batch has the same layout (decode steps of
        # an unchanged batch): key (adapters, query_lens, backend) and the residency it was built on.
        self._last: tuple[tuple[object, ...], int, LoRABatch] | None = None
        self._residency = 0  # bumped by every load and evict

    @property
    def bytes_per_row(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return elem * self.base.num_layers * sum(i + o for i, o in self.base.module_shapes.values())

    def allocate(self) -> None:
        """Create the pools (at the first adapter registration: an engine that never sees an
        adapter never pays for them, and the first load does not pay on the critical path)."""
        if self._a:
            return
        shapes = self.base.module_shapes
        dev, dt = self.device, self.dtype
        for _ in range(self.base.num_layers):
            a: dict[str, torch.Tensor] = {}
            groups: dict[tuple[str, ...], torch.Tensor] = {}
            for group in SHARED_INPUT_GROUPS:
                if len({shapes[m][0] for m in group}) == 1:
                    groups[group] = torch.zeros(self.capacity_rows, len(group), shapes[group[0]][0], device=dev, dtype=dt)
                    a.update({m: groups[group][:, i] for i, m in enumerate(group)})
            a.update({m: torch.zeros(self.capacity_rows, shapes[m][0], device=dev, dtype=dt) for m in TARGET_MODULES if m not in a})
            self._a.append(a)
            self._a_groups.append(groups)
            self._b.append({m: torch.zeros(self.capacity_rows, shapes[m][1], device=dev, dtype=dt) for m in TARGET_MODULES})

    def load(self, adapter: LoRAAdapter, row: int) -> None:
        self.allocate()
        rows = slice(row, row + adapter.max_rank)
        for layer in range(self.base.num_layers):
            for module in TARGET_MODULES:
                self._a[layer][module][rows].zero_()
                self._b[layer][module][rows].zero_()
        for (layer, module), w in adapter.weights.items():
            self._a[layer][module][row : row + w.rank].copy_(w.a, non_blocking=True)
            self._b[layer][module][row : row + w.rank].copy_(w.b_t, non_blocking=True)
        self.resident[adapter.name] = (row, adapter)
        self._residency += 1

    def evict(self, name: str) -> None:
        self.resident.pop(name, None)
        self._residency += 1

    def batch(
        self, adapters: Sequence[str | None], query_lens: Sequence[int], backend: Backend
    ) -> LoRABatch | None:
        """The hook for a batch whose sequences (in row order) use `adapters`; None if no adapter.

        Sequences sharing an adapter should be adjacent (the executor sorts them) so each adapter
        forms one segment; correctness does not depend on it.
        """
        key = (tuple(adapters), tuple(query_lens), backend)
        last = self._last
        if last is not None and last[1] == self._residency and last[0] == key:
            return last[2]  # the same segments as last step: nothing to rebuild or copy
        hook = self._build(adapters, query_lens, backend)
        self._last = (key, self._residency, hook) if hook is not None else None
        return hook

    def _build(self, adapters: Sequence[str | None], query_lens: Sequence[int], backend: Backend) -> LoRABatch | None:
        if all(a is None for a in adapters):
            return None
        runs: list[tuple[int, int, str]] = []  # (start, length, adapter) of consecutive rows
        pos = 0
        for name, n in zip(adapters, query_lens, strict=True):
            if name is not None:
                if runs and runs[-1][2] == name and runs[-1][0] + runs[-1][1] == pos:
                    runs[-1] = (runs[-1][0], runs[-1][1] + n, name)
                else:
                    runs.append((pos, n, name))
            pos += n
        # Per module, and per group of modules sharing an input: the runs whose adapter targets it.
        single = {m: self._group_runs(runs, (m,)) for m in TARGET_MODULES}
        segs = {m: self._segments(r, pos) for m, r in single.items()}
        grouped = {g: self._group_runs(runs, g) for g in SHARED_INPUT_GROUPS}
        dense: dict[tuple[str, ...], DensePlan] = {}
        if backend == "torch":
            by_key = {(m,): r for m, r in single.items()} | grouped
            dense = {key: plan for key, r in by_key.items() if (plan := self._dense(r, pos))}
        return LoRABatch(self._a, self._b, {m: s for m, s in segs.items() if s is not None}, backend,
                         a_groups=self._a_groups, grouped=grouped, dense=dense)

    def _group_runs(self, runs: list[tuple[int, int, str]], group: tuple[str, ...]) -> list[GroupRun]:
        """(start, length, first pool row, rows, which of `group`'s modules it targets) for every run
        whose adapter targets at least one of them."""
        out = []
        for start, n, name in runs:
            row, adapter = self.resident[name]
            hit = tuple(m in adapter.target_modules for m in group)
            if any(hit):
                out.append((start, n, row, adapter.max_rank, hit))
        return out

    def _dense(self, runs: Sequence[GroupRun], num_tokens: int) -> DensePlan | None:
        """For a small batch of several segments (decode steps), one shrink and one expand per module
        over the pool rows the batch's adapters span, with a 0/1 mask keeping each token row to its
        own adapter's rows: 2 matmuls per module instead of 2 per segment (tiny matmuls cost their
        call, not their FLOPs). None where per-segment matmuls are the better deal."""
        limit = DENSE_MAX_TOKENS_FP32 if self.dtype == torch.float32 else DENSE_MAX_TOKENS_HALF
        if len(runs) < 2 or num_tokens > limit:
            return None
        lo, hi = min(r[2] for r in runs), max(r[2] + r[3] for r in runs)
        if hi - lo > DENSE_MAX_ROWS:
            return None
        mask = torch.zeros(num_tokens, hi - lo, dtype=self.dtype)
        for start, n, row, rank, _ in runs:
            mask[start : start + n, row - lo : row - lo + rank] = 1
        hit = tuple(any(r[4][i] for r in runs) for i in range(len(runs[0][4])))
        return DensePlan(lo, hi, mask.to(self.device), hit)

    def _segments(self, runs: list[GroupRun], num_tokens: int) -> LoRASegments | None:
        if not runs:
            return None
        starts, lens, rows, ranks = [r[0] for r in runs], [r[1] for r in runs], [r[2] for r in runs], [r[3] for r in runs]
        return LoRASegments.build(starts, lens, rows, ranks, num_tokens, self.device)


# Batch rows up to which the masked dense LoRA path is taken (decode steps). Measured on 2 CPU
# cores at SmolLM2's q/k/v shapes, 4 adapters (r8/r16) in 4 segments, per layer: fp32 dense wins
# up to ~96 rows (129 vs 200 us at 32 rows, 280 vs 206 at 128); bf16, whose small matmuls cost
# more per call, up to 256 and beyond (303 vs 789 us at 64 rows, 597 vs 946 at 256).
DENSE_MAX_TOKENS_FP32 = 96
DENSE_MAX_TOKENS_HALF = 256
DENSE_MAX_ROWS = 512  # pool rows spanned by the batch's adapters, at most


@attrs.frozen
class DensePlan:
    """Pool rows [lo, hi) and the [tokens, hi - lo] 0/1 mask of a module's (or a group's) dense LoRA
    delta; `hit[i]`: some adapter of the batch targets the group's module i."""

    lo: int
    hi: int
    mask: torch.Tensor
    hit: tuple[bool, ...]


class LoRABatch:
    """Implements the model's `LoRAHook` for one batch."""

    def __init__(
        self,
        a: list[dict[str, torch.Tensor]],
        b: list[dict[str, torch.Tensor]],
        segments: Mapping[str, LoRASegments],
        backend: Backend,
        *,
        a_groups: Sequence[Mapping[tuple[str, ...], torch.Tensor]] = (),
        grouped: Mapping[tuple[str, ...], Sequence[GroupRun]] | None = None,
        dense: Mapping[tuple[str, ...], DensePlan] | None = None,
    ) -> None:
        self._a, self._b, self._segments, self._backend = a, b, segments, backend
        self._a_groups, self._grouped, self._dense = a_groups, grouped or {}, dense or {}

    def targets(self, module: str) -> bool:
        return module in self._segments

    def apply(self, layer: int, module: str, x: torch.Tensor, y: torch.Tensor) -> None:
        plan = self._dense.get((module,))
        if plan is not None:  # see LoRAPool._dense
            v = x @ self._a[layer][module][plan.lo : plan.hi].T
            y.addmm_(v * plan.mask, self._b[layer][module][plan.lo : plan.hi])
            return
        segs = self._segments.get(module)
        if segs is not None:
            lora_apply(y, x, self._a[layer][module], self._b[layer][module], segs, backend=self._backend)

    def apply_group(self, layer: int, modules: tuple[str, ...], x: torch.Tensor, ys: Sequence[torch.Tensor]) -> None:
        """`apply` for modules that share the input x, with one shrink matmul per segment (torch path)."""
        runs = self._grouped.get(modules)
        a_group = self._a_groups[layer].get(modules) if self._a_groups else None
        if self._backend != "torch" or runs is None or a_group is None:
            for module, y in zip(modules, ys, strict=True):
                self.apply(layer, module, x, y)
            return
        width = len(modules)
        b = self._b[layer]
        plan = self._dense.get(modules)
        if plan is not None:  # x [T, in] against every spanned pool row at once, then masked
            span = plan.hi - plan.lo
            v = (x @ a_group[plan.lo : plan.hi].reshape(span * width, -1).T).view(-1, span, width)
            for i, (module, y) in enumerate(zip(modules, ys, strict=True)):
                if plan.hit[i]:
                    y.addmm_(v[:, :, i] * plan.mask, b[module][plan.lo : plan.hi])
            return
        for start, n, row, rank, hit in runs:
            xs = x[start : start + n]
            # [n, rank * modules]: column r * modules + i is rank row r of module i.
            v = (xs @ a_group[row : row + rank].reshape(rank * width, -1).T).view(n, rank, width)
            for i, (module, y) in enumerate(zip(modules, ys, strict=True)):
                if hit[i]:
                    y[start : start + n].addmm_(v[:, :, i], b[module][row : row + rank])
