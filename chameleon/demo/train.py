"""Fine-tune the demo's PEFT LoRA adapters on SmolLM2-135M-Instruct, on the CPU, cached.

Each style (French, pirate, JSON) has 8 chat examples in `chameleon/demo/data/`. One adapter per
style: rank 8 on q/v/o of the top half of the layers only (`layers_to_transform`), AdamW at lr
5e-3, one example per step (12 steps, cycling), loss on the assistant's tokens only. Adapting only
the top half keeps the backward pass out of the bottom half (its activations are never recorded),
so a step costs about a third less; 12 steps are enough for each style to show at a glance.
Cached under `cache_dir()/demo-adapters/<hash>`, the hash covering the data, the settings and the
base model's config, so a second run loads instantly.

Training runs on one thread (`TRAIN_THREADS`): the matmuls of a ~40-token example are too small
for a second thread to pay for its synchronisation, and on a busy 2-core machine two spinning
OpenMP threads were 5-6x slower than one (22-32 s of CPU per adapter instead of 4-5 s). Measured
on a shared 2-core machine at load 5: imports 5.5 s and model load 0.7 s of CPU, then 4.2-5.2 s
of CPU per adapter, about 20 s of CPU in all (24 s of wall time at that load, for
`chameleon demo`'s "adapters ready"); the previous settings (16 steps on every layer) took 9-10 s
of CPU per adapter. On an idle 2-core machine that is about 20 s, well under the minute allowed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import attrs

STYLES = ("french", "pirate", "json")
TRAIN_THREADS = 1  # see the module docstring; the engine's own thread count is restored after
# A short system prompt (SmolLM2's default one is 20 tokens longer): every step is cheaper. The
# demo asks its question with the same one, so the adapters see what they were trained on.
SYSTEM = "Answer briefly."


@attrs.frozen
class TrainSettings:
    """What the adapters are trained with; every field is part of the cache key."""

    steps: int = 12
    lr: float = 5e-3
    rank: int = 8
    alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj", "o_proj")
    max_len: int = 96
    seed: int = 0
    first_layer_fraction: float = 0.5  # LoRA on layers [fraction * num_layers, num_layers) only


def load_dataset(style: str) -> list[list[dict[str, str]]]:
    """The chat examples of one style (each a list of messages ending with the assistant's)."""
    text = resources.files("chameleon.demo").joinpath("data", f"{style}.jsonl").read_text(encoding="utf-8")
    return [[system_message(), *json.loads(line)["messages"]] for line in text.splitlines() if line.strip()]


def system_message() -> dict[str, str]:
    return {"role": "system", "content": SYSTEM}


def cache_key(base_dir: Path, settings: TrainSettings, styles: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps(attrs.asdict(settings), sort_keys=True).encode())
    h.update((base_dir / "config.json").read_bytes())
    for style in styles:
        h.update(style.encode() + json.dumps(load_dataset(style)).encode())
    return h.hexdigest()[:16]


def train_demo_adapters(
    base_dir: Path | None = None,
    settings: TrainSettings | None = None,
    *,
    styles: Sequence[str] = STYLES,
    cache_root: Path | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Adapter directories by style, training the missing ones (cached; safe to interrupt)."""
    from chameleon.assets import cache_dir, smollm2_dir

    base_dir = Path(base_dir or smollm2_dir())
    settings = settings or TrainSettings()
    target = Path(cache_root or cache_dir() / "demo-adapters") / cache_key(base_dir, settings, styles)
    paths = {s: target / s for s in styles}
    if all((p / "adapter_config.json").is_file() for p in paths.values()):
        return paths
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".train-", dir=target.parent))
    try:
        _train_all(base_dir, settings, styles, tmp, progress)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return paths


def _train_all(base_dir: Path, settings: TrainSettings, styles: Sequence[str], out: Path, progress: bool) -> None:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    bar: Any = tqdm(
        total=settings.steps * len(styles), desc="training demo adapters", disable=not progress, unit="step"
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)
    try:
        for style in styles:
            examples = [_encode(tokenizer, m, settings.max_len) for m in load_dataset(style)]
            model = _train_one(model, examples, settings, out / style, bar, style)
    finally:
        torch.set_num_threads(threads)
        bar.close()


def _train_one(model: Any, examples: list[tuple[Any, int]], s: TrainSettings, out: Path, bar: Any, style: str) -> Any:
    """Train one adapter on `model` (one example per step), save it to `out`, return the bare base."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(s.seed)
    num_layers = int(model.config.num_hidden_layers)
    first = min(num_layers - 1, int(num_layers * s.first_layer_fraction))
    config = LoraConfig(
        r=s.rank,
        lora_alpha=s.alpha,
        target_modules=list(s.target_modules),
        layers_to_transform=list(range(first, num_layers)),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=s.lr)
    peft_model.train()
    for step in range(s.steps):
        loss = _answer_loss(peft_model, *examples[step % len(examples)])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        bar.set_postfix(adapter=style, loss=f"{loss.item():.2f}")
        bar.update()
    peft_model.save_pretrained(str(out))
    return peft_model.unload()


def _answer_loss(model: Any, ids: Any, n_answer: int) -> Any:
    """Cross-entropy on the answer's tokens only; logits are computed for those positions alone."""
    import torch.nn.functional as F

    logits = model(input_ids=ids, logits_to_keep=n_answer + 1).logits[0, :-1]
    return F.cross_entropy(logits.float(), ids[0, -n_answer:])


def _encode(tokenizer: Any, messages: list[dict[str, str]], max_len: int) -> tuple[Any, int]:
    """(token ids of prompt + answer + end-of-turn, number of answer tokens), cut to `max_len`."""
    import torch

    prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    answer = messages[-1]["content"] + (tokenizer.eos_token or "")
    p_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    a_ids = tokenizer(answer, add_special_tokens=False).input_ids[: max(1, max_len - len(p_ids))]
    return torch.tensor([p_ids + a_ids]), len(a_ids)
