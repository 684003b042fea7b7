"""Batch decode with LoRA adapters chosen per row, against the same model without adapter inputs.

    python scripts/adapters_bench.py CHECKPOINT OUT [--targets q,k,v,o] [--rank 16] [--rounds 3]

Exports CHECKPOINT twice into OUT (plain, and with inputs for 8 adapters of rank ``--rank`` on
``--targets``), makes 8 random PEFT adapters (A and B both random: PEFT starts B at zero) and
converts them, then runs 8 requests at once (``--prompt`` tokens each, ``--new`` new tokens, greedy)
three ways, alternating for ``--rounds`` rounds: the plain package, the LoRA package with no adapter
on any row, and the LoRA package with a different adapter on every row. Prints tokens per second
(medians) and checks that every row of the mixed batch equals that adapter's request run alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

MODULES = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj"}
MODULES["down"] = "down_proj"

parser = argparse.ArgumentParser()
parser.add_argument("checkpoint")
parser.add_argument("out")
parser.add_argument("--targets", default="q,k,v,o")
parser.add_argument("--rank", type=int, default=16)
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("--prompt", type=int, default=32)
parser.add_argument("--new", type=int, default=64)
parser.add_argument("--threads", type=int, default=2)
a = parser.parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from nextoken import Engine, SamplingParams, Scheduler  # noqa: E402
from nextoken.exporters import export  # noqa: E402
from nextoken.exporters.adapters import make_adapter  # noqa: E402

out, targets = Path(a.out), a.targets.split(",")
plain, lora = out / "plain", out / f"lora-{'-'.join(targets)}-r{a.rank}"
if not plain.exists():
    export(a.checkpoint, plain, progress=None, check=False)
if not lora.exists():
    export(a.checkpoint, lora, progress=None, check=False, lora_adapters=8, lora_rank=a.rank, lora_targets=targets)
adapters = {}
for k in range(8):
    folder = out / f"adapter{k}-{'-'.join(targets)}-r{a.rank}"
    if not folder.exists():
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=torch.float32)
        config = LoraConfig(
            r=a.rank, lora_alpha=a.rank, target_modules=[MODULES[t] for t in targets], init_lora_weights=False
        )
        peft = get_peft_model(model, config)
        for name, p in peft.named_parameters():  # small adapters: a fine-tune's size, not a random one's
            if "lora_B" in name:
                p.data *= 0.01
        peft.save_pretrained(out / f"peft{k}")
        make_adapter(out / f"peft{k}", lora, folder)
    adapters[f"a{k}"] = folder

rng = np.random.default_rng(0)
prompts = [[int(t) for t in rng.integers(3, 1000, size=a.prompt)] for _ in range(8)]
params = SamplingParams(max_new_tokens=a.new, temperature=0, ignore_eos=True)


def batch(engine: Engine, names: list[str | None]) -> tuple[float, list[list[int]]]:
    scheduler = Scheduler(engine, max_batch=8)
    handles = [scheduler.submit(p, params, adapter=n) for p, n in zip(prompts, names)]
    start = time.perf_counter()
    while not all(h.done for h in handles):
        scheduler.step()
    seconds = time.perf_counter() - start
    return 8 * a.new / seconds, [h.result().token_ids for h in handles]


options = {"device": "cpu", "plugins": False, "threads": a.threads, "prefix_cache_bytes": 0}
engines = {
    "plain": Engine(plain, **options),
    "lora, no adapter": Engine(lora, **options),
    "lora, 8 adapters": Engine(lora, adapters=adapters, **options),
}
names = {"plain": [None] * 8, "lora, no adapter": [None] * 8, "lora, 8 adapters": list(adapters)}
rates: dict[str, list[float]] = {k: [] for k in engines}
answers: dict[str, list[list[int]]] = {}
for _ in range(a.rounds):
    for key, engine in engines.items():
        rate, answers[key] = batch(engine, names[key])
        rates[key].append(rate)
mixed = engines["lora, 8 adapters"]
alone = [mixed.generate(p, params, adapter=n).token_ids for p, n in zip(prompts, adapters)]
base = statistics.median(rates["plain"])
print(
    f"8 requests x {a.prompt} prompt + {a.new} new tokens, greedy, {a.threads} threads; adapters rank {a.rank} "
    f"on {','.join(targets)}; {a.rounds} rounds alternating, medians"
)
for key, values in rates.items():
    median = statistics.median(values)
    print(f"  {key:18} {median:7.1f} tok/s  ({median / base:.2f}x plain)  runs {', '.join(f'{v:.1f}' for v in values)}")
print(f"mixed batch == each adapter alone: {sum(x == y for x, y in zip(answers['lora, 8 adapters'], alone))}/8")
print(f"adapters change the answers: {sum(x != y for x, y in zip(answers['lora, 8 adapters'], answers['plain']))}/8")
