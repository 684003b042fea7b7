"""``nextoken bench``: prefill and decode speed of a package, and where each decode step's time goes
(inside ONNX Runtime's ``run`` versus everything nextoken does around it)."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from .engine import Engine
from .errors import InvalidRequestError
from .generation import SamplingParams

__all__ = ["run_bench", "BenchRow", "BenchReport", "CHAIN"]

#: The full built-in chain: every processor that changes a distribution, sampling, two stop strings.
CHAIN = dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=0,
             stop=("<<no such stop>>", "THE END OF IT ALL"))


@dataclass
class BenchRow:
    """Medians over the runs of one setting."""

    setting: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float      # per sequence
    total_tokens_per_s: float       # the batch together
    step_ms: float                  # one decode step, wall
    model_step_ms: float            # of which inside session.run
    outside_step_ms: float          # of which everything else: processors, sampling, stops, text

    @property
    def outside_share(self) -> float:
        return self.outside_step_ms / self.step_ms if self.step_ms else 0.0


@dataclass
class BenchReport:
    package: str
    device: str
    threads: int | None
    spin: bool
    rows: list[BenchRow]

    def to_dict(self) -> dict[str, Any]:
        return {"package": self.package, "device": self.device, "threads": self.threads, "spin": self.spin,
                "rows": [{**asdict(r), "outside_share": r.outside_share} for r in self.rows]}

    def table(self) -> str:
        head = (f"{'setting':8} {'batch':>5} {'prompt':>6} {'new':>4} {'prefill ms':>10} {'tok/s/seq':>9} "
                f"{'tok/s':>8} {'step ms':>8} {'in run':>7} {'outside':>8} {'outside%':>8}")
        lines = [f"{self.package} on {self.device} (threads {self.threads or 'default'}, spin {'on' if self.spin else 'off'})",
                 head]
        for r in self.rows:
            lines.append(
                f"{r.setting:8} {r.batch:>5} {r.prompt_tokens:>6} {r.new_tokens:>4} {r.prefill_ms:>10.2f} "
                f"{r.decode_tokens_per_s:>9.1f} {r.total_tokens_per_s:>8.1f} {r.step_ms:>8.3f} "
                f"{r.model_step_ms:>7.3f} {r.outside_step_ms:>8.3f} {100 * r.outside_share:>7.1f}%"
            )
        return "\n".join(lines)


def _prompts(engine: Engine, batch: int, length: int) -> list[list[int]]:
    vocab = engine.manifest.vocab_size
    rng = np.random.default_rng(0)
    low = min(3, vocab - 1)
    return [rng.integers(low, vocab, size=length).tolist() for _ in range(batch)]


def _one(engine: Engine, prompts: list[list[int]], params: SamplingParams) -> dict[str, float]:
    gen = engine.start(prompts, params)
    completions = gen.completions()
    steps = gen.state.step
    decode_wall = max(gen.seqs[i].last_token_time for i in range(len(prompts))) - gen.first_token_time
    decode_model = gen.model_seconds - gen.prefill_model_seconds
    n_decode = max(steps - 1, 1)
    return {
        "prefill_ms": (gen.prefill_done - gen.start) * 1e3,
        "decode_tokens_per_s": statistics.median(c.usage.decode_tokens_per_s for c in completions),
        "total_tokens_per_s": len(prompts) * (steps - 1) / decode_wall if decode_wall > 0 else 0.0,
        "step_ms": decode_wall / n_decode * 1e3,
        "model_step_ms": decode_model / n_decode * 1e3,
        "outside_step_ms": (decode_wall - decode_model) / n_decode * 1e3,
    }


def run_bench(engine: Engine, batches: Sequence[int] = (1, 8), prompt_tokens: int = 128, new_tokens: int = 128,
              repeat: int = 3, chain: bool = False) -> BenchReport:
    """Generate ``new_tokens`` (EOS ignored) after a ``prompt_tokens`` prompt at each batch size,
    ``repeat`` times after one warm-up; medians. ``chain`` adds the full built-in chain's runs."""
    if prompt_tokens + new_tokens > engine.manifest.context_length:
        raise InvalidRequestError(
            f"prompt {prompt_tokens} + new {new_tokens} tokens exceed the context window "
            f"({engine.manifest.context_length}); use smaller --prompt-tokens/--new"
        )
    if any(b < 1 for b in batches):
        raise InvalidRequestError(f"batch sizes must be >= 1, not {list(batches)}")
    settings = [("greedy", SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))]
    if chain:
        settings.append(("chain", SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **CHAIN)))
    rows = []
    for batch in batches:
        prompts = _prompts(engine, batch, prompt_tokens)
        for name, params in settings:
            _one(engine, prompts, params)                                    # warm-up
            runs = [_one(engine, prompts, params) for _ in range(repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append(BenchRow(name, batch, prompt_tokens, new_tokens, **med))
    return BenchReport(str(engine.path), engine.device.describe(), engine.threads, engine.spin, rows)
