"""Engine-side fault isolation: a fault fails the requests it concerns, never its batch neighbours.

A broken adapter (files deleted or changed before a reload from disk) fails only its requests and is
quarantined; a failing sampling row fails only its request; a whole-batch fault aborts that batch;
a `schedule()` failure fails only the waiting requests. Nothing leaks in any path.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from chameleon import EngineConfig, SamplingParams
from chameleon.engine.core import EngineCore
from chameleon.engine.factory import build_core
from chameleon.errors import AdapterQuarantinedError, AdapterValidationError
from chameleon.executor import torch_executor


def drain(core: EngineCore, limit: int = 500) -> dict[str, list]:
    outs: dict[str, list] = {}
    for _ in range(limit):
        if not core.has_unfinished_requests():
            break
        for out in core.step():
            outs.setdefault(out.request_id, []).append(out)
    assert not core.has_unfinished_requests()
    return outs


def assert_idle_and_clean(core: EngineCore) -> None:
    stats = core.stats()
    assert stats.kv.blocks_in_use == 0 and stats.adapters.ref_count == 0
    assert stats.requests.running == 0 and stats.requests.waiting == 0


def params(**kw: object) -> SamplingParams:
    return SamplingParams(**{"max_tokens": 4, "ignore_eos": True, "temperature": 0, **kw})  # type: ignore[arg-type]


def copy_adapters(tiny_adapters: dict[str, Path], tmp_path: Path, names: tuple[str, ...]) -> dict[str, Path]:
    out = {}
    for name in names:
        out[name] = tmp_path / name
        shutil.copytree(tiny_adapters[name], out[name])
    return out


@pytest.mark.parametrize("fault", ["deleted", "changed"])
@pytest.mark.parametrize("prefetch_depth", [0, 8])
def test_a_broken_adapter_fails_only_its_requests_and_is_quarantined(
    tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path, fault: str, prefetch_depth: int
) -> None:
    paths = copy_adapters(tiny_adapters, tmp_path, ("a8", "b16"))
    # One adapter in host memory at a time: a8 is reloaded from disk when it is next needed.
    config = EngineConfig(dtype="float32", max_cpu_adapters=1, adapter_prefetch_depth=prefetch_depth)
    core = build_core(tiny_llama, config)
    core.add_adapter("a8", str(paths["a8"]))
    core.add_adapter("b16", str(paths["b16"]))
    if fault == "deleted":
        shutil.rmtree(paths["a8"])
    else:  # same names, other contents: the reload must not serve different weights
        target = paths["a8"] / "adapter_model.safetensors"
        data = bytearray(target.read_bytes())
        data[-64:] = bytes(64)
        target.write_bytes(bytes(data))
    core.add_request("base", [1, 2, 3], params())
    core.add_request("b", [4, 5, 6], params(), adapter="b16")
    core.add_request("a", [7, 8, 9], params(), adapter="a8")
    core.add_request("a-too", [7, 8], params(), adapter="a8")
    outs = drain(core)
    for rid in ("a", "a-too"):
        assert outs[rid][-1].finish_reason == "abort" and "quarantined" in (outs[rid][-1].error or "")
    for rid in ("base", "b"):  # the same batches, untouched
        assert outs[rid][-1].finish_reason == "length" and outs[rid][-1].error is None
        assert sum(len(o.token_ids) for o in outs[rid]) == 4
    info = core.adapters["a8"]
    assert info.broken and info.error
    with pytest.raises(AdapterQuarantinedError):
        core.add_request("again", [1], params(), adapter="a8")
    assert_idle_and_clean(core)
    # Not retried forever: the next requests never touch it. Removed and re-added, it serves again.
    core.remove_adapter("a8")
    core.add_adapter("a8", str(tiny_adapters["a8"]))
    assert not core.adapters["a8"].broken
    core.add_request("healed", [7, 8, 9], params(), adapter="a8")
    assert drain(core)["healed"][-1].finish_reason == "length"
    assert_idle_and_clean(core)


def test_a_failing_sampling_row_fails_only_its_request(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = torch_executor.sample_from_hidden

    def flaky(hidden, params, generators, **kw):  # type: ignore[no-untyped-def]
        if any(p.seed == 666 for p in params):  # the poisoned row
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real(hidden, params, generators, **kw)

    monkeypatch.setattr(torch_executor, "sample_from_hidden", flaky)
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    core.add_request("ok1", [1, 2, 3], params(temperature=0.8, seed=1))
    core.add_request("poison", [1, 2, 3], params(temperature=0.8, seed=666))
    core.add_request("ok2", [4, 5], params())
    outs = drain(core)
    assert outs["poison"][-1].finish_reason == "abort" and "probability tensor" in (outs["poison"][-1].error or "")
    for rid in ("ok1", "ok2"):
        assert outs[rid][-1].finish_reason == "length" and sum(len(o.token_ids) for o in outs[rid]) == 4
    assert_idle_and_clean(core)


def test_an_adapter_with_huge_weights_fails_at_most_its_own_request(
    tiny_llama: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    from safetensors.torch import load_file, save_file

    path = copy_adapters(tiny_adapters, tmp_path, ("a8",))["a8"]
    file = path / "adapter_model.safetensors"
    weights = {k: (v * 1e30 if "lora_" in k else v) for k, v in load_file(file).items()}  # finite, but inf logits
    save_file(weights, file, metadata={"format": "pt"})
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    # Refused before anything is allocated (weights above 1e4 in magnitude), so it can never
    # poison a batch; the base request runs as usual.
    with pytest.raises(AdapterValidationError):
        core.add_adapter("huge", str(path))
    core.add_request("base", [1, 2, 3], params(temperature=1.0, seed=3))
    outs = drain(core)
    assert outs["base"][-1].finish_reason == "length" and outs["base"][-1].error is None
    assert_idle_and_clean(core)


def test_a_whole_batch_fault_aborts_that_batch_and_the_engine_goes_on(
    tiny_llama: Path, tiny_adapters: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    core.add_adapter("a8", str(tiny_adapters["a8"]))
    core.add_request("x", [1, 2, 3], params())
    core.add_request("y", [1, 2, 3], params(), adapter="a8")
    real = core.executor.execute
    monkeypatch.setattr(core.executor, "execute", lambda step: (_ for _ in ()).throw(RuntimeError("device lost")))
    outs = core.step()
    assert sorted((o.request_id, o.finish_reason) for o in outs) == [("x", "abort"), ("y", "abort")]
    assert all("device lost" in (o.error or "") for o in outs)
    assert not core.adapters["a8"].broken  # a device fault is not the adapter's fault
    assert_idle_and_clean(core)
    monkeypatch.setattr(core.executor, "execute", real)
    core.add_request("z", [1, 2, 3], params(), adapter="a8")
    assert drain(core)["z"][-1].finish_reason == "length"
    assert_idle_and_clean(core)


def test_a_schedule_failure_fails_only_the_waiting_requests(tiny_llama: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    core = build_core(tiny_llama, EngineConfig(dtype="float32"))
    core.add_request("running", [1, 2, 3], params(max_tokens=6))
    assert core.step()  # admitted, first token out
    core.add_request("waiting", [4, 5, 6], params())
    calls = {"n": 0}
    real = core.scheduler._admit

    def broken_admit(*args, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise ZeroDivisionError("policy bug")
        return real(*args, **kw)

    monkeypatch.setattr(core.scheduler, "_admit", broken_admit)
    outs = core.step()
    assert [(o.request_id, o.finish_reason) for o in outs] == [("waiting", "abort")]
    assert "policy bug" in (outs[0].error or "")
    rest = drain(core)
    assert rest["running"][-1].finish_reason == "length"
    assert_idle_and_clean(core)
