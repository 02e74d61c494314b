"""The CPU fast paths (issue 7) compute what the plain formulations compute.

Paged attention against a float64 per-sequence reference over mixed batches (decodes, fresh
prefills, chunked prefills continuing a cached prefix, padding to a bucketed row count); the greedy
LM head that never materialises logits against `logits().argmax()`, ties included; the grouped
LoRA shrink against the per-module one; the bucketing of row counts.
"""

from __future__ import annotations

import random

import pytest
import torch

from chameleon.model.attention import build_attention_metadata, paged_attention
from chameleon.model.llama import padded_rows
from chameleon.model.lm_head import PackedLMHead


def _reference(q, k, v, k_cache, v_cache, query_lens, context_lens, tables, block_size, scale):  # type: ignore[no-untyped-def]
    """Per sequence, in float64: write this step's K/V into the cache, attend causally."""
    kc, vc = k_cache.double().clone(), v_cache.double().clone()
    h, kvh = q.shape[1], k.shape[1]
    out, row = [], 0
    for n, ctx, table in zip(query_lens, context_lens, tables, strict=True):
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(ctx)])
        kc[slots[ctx - n :]] = k[row : row + n].double()
        vc[slots[ctx - n :]] = v[row : row + n].double()
        keys = kc[slots].repeat_interleave(h // kvh, dim=1)  # [ctx, H, D]
        vals = vc[slots].repeat_interleave(h // kvh, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[row : row + n].double(), keys) * scale
        pos = torch.arange(ctx - n, ctx)
        scores = scores.masked_fill(torch.arange(ctx)[None, None, :] > pos[None, :, None], float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vals).reshape(n, -1))
        row += n
    return torch.cat(out)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 0.1)])
def test_paged_attention_matches_reference(dtype: torch.dtype, tol: float) -> None:
    rng = random.Random(0)
    torch.manual_seed(0)
    block_size = 4
    for _ in range(60):
        heads, kv_heads, dim = rng.choice([(8, 2, 16), (4, 4, 8), (6, 3, 16)])
        query_lens, context_lens, tables = [], [], []
        free = list(range(1, 200))
        rng.shuffle(free)
        for _ in range(rng.randint(1, 6)):
            kind = rng.random()
            if kind < 0.4:  # decode
                q_len, ctx = 1, rng.randint(1, 30)
            elif kind < 0.7:  # fresh prefill
                q_len = rng.randint(2, 12)
                ctx = q_len
            else:  # a prefill chunk after a cached prefix
                q_len = rng.randint(2, 10)
                ctx = q_len + rng.randint(1, 15)
            tables.append([free.pop() for _ in range(-(-ctx // block_size))])
            query_lens.append(q_len)
            context_lens.append(ctx)
        t = sum(query_lens)
        k_cache = torch.randn(200 * block_size, kv_heads, dim, dtype=dtype)
        v_cache = torch.randn(200 * block_size, kv_heads, dim, dtype=dtype)
        q = torch.randn(t, heads, dim, dtype=dtype)
        k, v = torch.randn(t, kv_heads, dim, dtype=dtype), torch.randn(t, kv_heads, dim, dtype=dtype)
        scale = dim**-0.5
        ref = _reference(q, k, v, k_cache, v_cache, query_lens, context_lens, tables, block_size, scale)
        meta = build_attention_metadata(query_lens, context_lens, tables, block_size, torch.device("cpu"))
        pad = rng.choice([0, 3])
        out = paged_attention(q, k, v, k_cache, v_cache, meta, scale, out_rows=t + pad)
        assert out.shape == (t + pad, heads * dim)
        assert (out[:t].double() - ref).abs().max().item() < tol, (query_lens, context_lens)
        assert not out[t:].any()  # padding rows are zero


def test_chunked_greedy_head_is_argmax_with_first_index_on_ties() -> None:
    """Integer weights and inputs make exact ties everywhere: within a group, across groups of a
    chunk, across chunks; and ragged last chunks (vocabularies not a multiple of the chunk or group)."""
    from chameleon.model.llama import onednn_packing_supported

    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        if not onednn_packing_supported(dtype, torch.device("cpu")):
            continue
        for vocab, chunk in ((1000, 256), (4096, 1024), (300, 128), (130, 8192), (49152, 8192)):
            w = torch.randint(-2, 3, (vocab, 32)).to(dtype)
            head = PackedLMHead(w, chunk)
            for rows in (1, 5, 40):
                h = torch.randint(-1, 2, (rows, 32)).to(dtype)
                logits = head.logits(h)
                assert torch.equal(logits, torch.nn.functional.linear(h.float(), w.float()))
                assert torch.equal(head.greedy(h), logits.argmax(-1)), (dtype, vocab, chunk, rows)
    with pytest.raises(ValueError):
        PackedLMHead(torch.zeros(256, 8), 100)  # not a multiple of the group


def test_padded_rows_buckets() -> None:
    buckets = {padded_rows(m) for m in range(1, 8193)}
    assert len(buckets) <= 80  # bounded number of matmul shapes
    for m in range(1, 8193):
        p = padded_rows(m)
        assert m <= p < m + max(8, m // 8 + 1)  # at most 12.5% (or 7 rows) of padding


def test_greedy_head_matches_logits_argmax(tiny_llama) -> None:  # type: ignore[no-untyped-def]
    from chameleon.model.llama import onednn_packing_supported
    from chameleon.model.loader import load_hf_config, load_model
    from chameleon.model.spec import model_spec_from_config

    spec = model_spec_from_config(load_hf_config(tiny_llama))
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(tiny_llama, spec, dtype, torch.device("cpu"), max_positions=64)
        h = torch.randn(40, spec.hidden_size, dtype=dtype)
        dense = model.logits(h)
        assert torch.equal(model.greedy_tokens(h), dense.argmax(-1))
        if onednn_packing_supported(dtype, torch.device("cpu")):
            model.pack_weights(head_chunk_rows=4096)  # several chunks
            for rows in (1, 7, 40):
                packed = model.logits(h[:rows])
                assert torch.allclose(packed, dense[:rows], rtol=1e-2 if dtype == torch.bfloat16 else 1e-4, atol=1e-3)
                assert torch.equal(model.greedy_tokens(h[:rows]), packed.argmax(-1))


def test_grouped_lora_shrink_matches_per_module() -> None:
    from chameleon.lora.peft_adapter import BaseModelSpec, LoRAAdapter, LoRAModuleWeights
    from chameleon.lora.pool import LoRAPool

    shapes = {"q_proj": (16, 16), "k_proj": (16, 8), "v_proj": (16, 8), "o_proj": (16, 16),
              "gate_proj": (16, 32), "up_proj": (16, 32), "down_proj": (32, 16)}
    base = BaseModelSpec(num_layers=1, module_shapes=shapes, dtype=torch.float32)
    pool = LoRAPool(base, 64, device=torch.device("cpu"), dtype=torch.float32)
    torch.manual_seed(0)

    def adapter(name: str, rank: int, modules: tuple[str, ...]) -> LoRAAdapter:
        weights = {(0, m): LoRAModuleWeights(layer=0, module=m, rank=rank, a=torch.randn(rank, shapes[m][0]),
                                             b_t=torch.randn(rank, shapes[m][1]), scale=1.0)
                   for m in modules}
        return LoRAAdapter(name=name, path="", rank=rank, max_rank=rank, target_modules=tuple(sorted(modules)),
                           weights=weights, nbytes=0, content_hash=name, dtype=torch.float32)

    ads = {"x": adapter("x", 4, ("q_proj", "v_proj")), "y": adapter("y", 8, ("q_proj", "k_proj", "v_proj", "gate_proj"))}
    pool.load(ads["x"], 0)
    pool.load(ads["y"], 4)
    rows_of = [None] * 3 + ["x"] * 2 + ["y"] * 4 + ["x"]  # adapters [None, x, y, x], query lengths [3, 2, 4, 1]
    batch = pool.batch([None, "x", "y", "x"], [3, 2, 4, 1], "torch")
    assert batch is not None
    x = torch.randn(10, 16)

    def oracle(module: str, y: torch.Tensor) -> torch.Tensor:
        """y plus each row's own adapter's delta, from the adapter's weights (not the pool)."""
        out = y.clone()
        for t, name in enumerate(rows_of):
            w = ads[name].weights.get((0, module)) if name else None
            if w is not None:
                out[t] += (x[t] @ w.a.T) @ w.b_t
        return out

    def check_groups(batch: object, dense: bool) -> None:
        assert (("q_proj", "k_proj", "v_proj") in batch._dense) == dense  # type: ignore[attr-defined]
        for group in (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")):
            ys = [torch.randn(10, shapes[m][1]) for m in group]
            expect = [oracle(m, y) for m, y in zip(group, ys, strict=True)]
            singles = [y.clone() for y in ys]
            for m, y in zip(group, singles, strict=True):
                batch.apply(0, m, x, y)  # type: ignore[attr-defined]
            batch.apply_group(0, group, x, ys)  # type: ignore[attr-defined]
            for y, one, e in zip(ys, singles, expect, strict=True):
                torch.testing.assert_close(y, e)
                torch.testing.assert_close(one, e)

    # Three segments (x, y, x) in 10 rows: q/k/v take the masked dense path (x's k_proj rows are
    # zero: x does not target it); gate/up, one segment (y), the per-segment one.
    check_groups(batch, dense=True)
    batch._dense = {}  # the per-segment path, on the same batch
    check_groups(batch, dense=False)

    # The hook is reused while the layout holds (decode steps), rebuilt when it changes.
    assert pool.batch([None, "x", "y", "x"], [3, 2, 4, 1], "torch") is batch
    assert batch.targets("q_proj") and batch.targets("gate_proj") and not batch.targets("o_proj")
    assert pool.batch([None, "x", "y", "x"], [1, 1, 1, 1], "torch") is not batch  # other query lengths
    again = pool.batch([None, "x", "y", "x"], [3, 2, 4, 1], "torch")
    assert again is not batch and again is not None
    ads["x"] = adapter("x", 4, ("q_proj", "v_proj"))  # x moves (new weights): its rows change
    pool.load(ads["x"], 20)
    moved = pool.batch([None, "x", "y", "x"], [3, 2, 4, 1], "torch")
    assert moved is not again
    pool._a[0]["q_proj"][12:20] = 7.0  # rows inside the span that no adapter of the batch owns
    check_groups(moved, dense=True)  # the span is rows 4-24 (y 4-12, x 20-24): 12-20 masked out
    assert pool.batch(["y"] * 2 + ["x"] * 300, [1] * 302, "torch")._dense == {}  # type: ignore[union-attr]
    pool.evict("y")
    assert pool.batch([None, "x", None, "x"], [3, 2, 4, 1], "torch") is not moved
    assert pool.batch([None, None], [3, 2], "torch") is None
