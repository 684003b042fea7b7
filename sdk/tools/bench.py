"""``nextoken bench``: prefill and decode speed of a package, and where each decode step's time goes
(inside ONNX Runtime's ``run`` versus everything nextoken does around it)."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine import Engine
from ..errors import InvalidRequestError, NextokenError
from ..types import SamplingParams

__all__ = [
    "CHAIN",
    "PEERS",
    "BenchReport",
    "BenchRow",
    "CompareReport",
    "PeerRow",
    "SpeculativeReport",
    "run_bench",
    "run_compare",
    "run_speculative",
]

#: The full built-in chain: every processor that changes a distribution, sampling, two stop strings.
CHAIN: dict[str, Any] = dict(
    temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=0, stop=("<<no such stop>>", "THE END OF IT ALL")
)
#: Constrained decoding: a JSON schema whose free string field outlasts any run (greedy, EOS ignored).
CONSTRAINED: dict[str, Any] = dict(
    response_format={
        "type": "json_schema",
        "json_schema": {
            "name": "bench",
            "schema": {
                "type": "object",
                "properties": {"title": {"type": "string"}, "story": {"type": "string"}},
                "required": ["title", "story"],
            },
        },
    }
)


@dataclass
class BenchRow:
    """Medians over the runs of one setting."""

    setting: str
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_ms: float
    decode_tokens_per_s: float  # per sequence
    total_tokens_per_s: float  # the batch together
    step_ms: float  # one decode step, wall
    model_step_ms: float  # of which inside session.run
    outside_step_ms: float  # of which everything else: processors, sampling, stops, text

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
    #: with ``chain``: milliseconds per decode step spent in each plugin, by batch size then hook
    hooks: dict[int, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": self.package,
            "device": self.device,
            "threads": self.threads,
            "spin": self.spin,
            "rows": [{**asdict(r), "outside_share": r.outside_share} for r in self.rows],
            "hooks_ms_per_step": {str(b): h for b, h in self.hooks.items()},
        }

    def hook_table(self) -> str:
        """Time per decode step in each plugin of the chain, at each batch size, and its share of the step."""
        if not self.hooks:
            return ""
        batches = sorted(self.hooks)
        steps = {r.batch: r.step_ms for r in self.rows if r.setting == "chain"}
        names = sorted({k for h in self.hooks.values() for k in h}, key=lambda k: -self.hooks[batches[0]].get(k, 0.0))
        lines = [
            "per hook, ms per decode step (share of the chain's step)",
            f"{'hook':36}" + "".join(f" {'batch ' + str(b):>17}" for b in batches),
        ]
        for name in names + ["all plugins"]:
            cells = []
            for b in batches:
                ms = sum(self.hooks[b].values()) if name == "all plugins" else self.hooks[b].get(name, 0.0)
                share = 100 * ms / steps[b] if steps.get(b) else 0.0
                cells.append(f" {ms:>9.4f} ({share:4.1f}%)")
            lines.append(f"{name:36}" + "".join(cells))
        return "\n".join(lines)

    def table(self) -> str:
        head = (
            f"{'setting':8} {'batch':>5} {'prompt':>6} {'new':>4} {'prefill ms':>10} {'tok/s/seq':>9} "
            f"{'tok/s':>8} {'step ms':>8} {'in run':>7} {'outside':>8} {'outside%':>8}"
        )
        lines = [
            f"{self.package} on {self.device} (threads {self.threads or 'default'}, spin {'on' if self.spin else 'off'})",
            head,
        ]
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
    completions = engine.complete(gen)
    steps = gen.state.step
    t = gen.timings()
    decode_wall = max(t.last_tokens) - t.first_token
    decode_model = t.model_seconds - t.prefill_model_seconds
    n_decode = max(steps - 1, 1)
    return {
        "prefill_ms": (t.prefilled - t.start) * 1e3,
        "decode_tokens_per_s": statistics.median(c.usage.decode_tokens_per_s for c in completions),
        "total_tokens_per_s": len(prompts) * (steps - 1) / decode_wall if decode_wall > 0 else 0.0,
        "step_ms": decode_wall / n_decode * 1e3,
        "model_step_ms": decode_model / n_decode * 1e3,
        "outside_step_ms": (decode_wall - decode_model) / n_decode * 1e3,
    }


def run_bench(
    engine: Engine,
    batches: Sequence[int] = (1, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    repeat: int = 3,
    chain: bool = False,
    constrained: bool = False,
) -> BenchReport:
    """Generate ``new_tokens`` (EOS ignored) after a ``prompt_tokens`` prompt at each batch size,
    ``repeat`` times after one warm-up; medians. ``chain`` adds the full built-in chain's runs,
    ``constrained`` runs under a JSON schema (:data:`CONSTRAINED`)."""
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
    if constrained:
        settings.append(("json", SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, **CONSTRAINED)))
    rows, hooks = [], {}
    for batch in batches:
        prompts = _prompts(engine, batch, prompt_tokens)
        for name, params in settings:
            _one(engine, prompts, params)  # warm-up
            runs = [_one(engine, prompts, params) for _ in range(repeat)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            rows.append(BenchRow(name, batch, prompt_tokens, new_tokens, **med))
            if name == "chain":  # one more run, timed per hook (not in the figures above)
                usage = engine.complete(engine.start(prompts, params.replace(hook_timings=True)))[0].usage
                hooks[batch] = {k: v / max(usage.steps, 1) for k, v in (usage.hook_ms or {}).items()}
    return BenchReport(str(engine.path), engine.device.describe(), engine.threads, engine.spin, rows, hooks)


# -- speculative decoding against plain ----------------------------------------------------------------


@dataclass
class SpeculativeReport:
    """Decode tok/s at batch 1 with and without speculation, side by side in one run: by task and
    setting, medians over the runs, the guesses kept and made (last run), and whether the tokens
    were identical in every run."""

    package: str
    device: str
    threads: int | None
    spin: bool
    new_tokens: int
    #: (task, method, k, prompt tokens, plain tok/s, speculative tok/s, kept, guessed, identical)
    rows: list[tuple[str, str, int, int, float, float, int, int, bool]]

    def to_dict(self) -> dict[str, Any]:
        keys = (
            "task",
            "method",
            "k",
            "prompt_tokens",
            "plain_tok_s",
            "speculative_tok_s",
            "kept",
            "guessed",
            "identical",
        )
        return {
            "package": self.package,
            "device": self.device,
            "threads": self.threads,
            "spin": self.spin,
            "new_tokens": self.new_tokens,
            "rows": [dict(zip(keys, r)) for r in self.rows],
        }

    def table(self) -> str:
        lines = [
            f"{self.package} on {self.device} (threads {self.threads or 'default'}, spin "
            f"{'on' if self.spin else 'off'}), batch 1, {self.new_tokens} new tokens, greedy",
            f"{'task':18} {'method':14} {'k':>3} {'prompt':>6} {'plain tok/s':>11} {'spec tok/s':>10} "
            f"{'ratio':>6} {'kept/guessed':>12} identical",
        ]
        for task, method, k, prompt, plain, spec, kept, guessed, same in self.rows:
            lines.append(
                f"{task:18} {method:14} {k:>3} {prompt:>6} {plain:>11.0f} {spec:>10.0f} "
                f"{spec / plain if plain else 0.0:>5.2f}x {f'{kept}/{guessed}':>12} {same}"
            )
        return "\n".join(lines)


def speculative_tasks(engine: Engine, story_tokens: int = 300) -> dict[str, list[int]]:
    """Two prompts: one whose continuation largely repeats it (the model's own greedy story from a
    seed, then the seed and the story's first words again: it goes on much as it did the first
    time) and one with nothing to copy (the seed alone)."""
    seed = engine.encode("Once upon a time") if engine.tokenizer is not None else _prompts(engine, 1, 8)[0]
    story = engine.generate(seed, max_new_tokens=story_tokens + 24, ignore_eos=True).token_ids
    return {"copies its prompt": seed + story[:story_tokens] + seed + story[:24], "nothing to copy": seed}


def run_speculative(
    engine: Engine,
    settings: Sequence[dict],
    new_tokens: int = 150,
    repeat: int = 5,
    tasks: dict[str, list[int]] | None = None,
) -> SpeculativeReport:
    """Each task (default :func:`speculative_tasks`) decoded plainly and with each speculative
    setting (``{"method": ..., "k": ...}``), alternating, ``repeat`` times after a warm-up; greedy."""
    tasks = tasks if tasks is not None else speculative_tasks(engine)
    room = engine.manifest.context_length - max(len(p) for p in tasks.values())
    if room < 2:
        raise InvalidRequestError(f"the tasks' prompts fill the context window ({engine.manifest.context_length})")
    new_tokens = min(new_tokens, room)
    rows = []
    for task, prompt in tasks.items():
        for setting in settings:
            params = SamplingParams(max_new_tokens=new_tokens)
            speculative = params.replace(speculative=dict(setting))
            engine.generate(prompt, params), engine.generate(prompt, speculative)  # warm-up
            plain, spec, same = [], [], True
            for _ in range(repeat):
                a, b = engine.generate(prompt, params), engine.generate(prompt, speculative)
                plain.append(a.usage.decode_tokens_per_s)
                spec.append(b.usage.decode_tokens_per_s)
                same &= a.token_ids == b.token_ids
            rows.append(
                (
                    task,
                    setting["method"],
                    int((speculative.speculative or {}).get("k", 0)),
                    len(prompt),
                    statistics.median(plain),
                    statistics.median(spec),
                    b.usage.accepted_tokens,
                    b.usage.proposed_tokens,
                    same,
                )
            )
    return SpeculativeReport(str(engine.path), engine.device.describe(), engine.threads, engine.spin, new_tokens, rows)


# -- comparing with peers ------------------------------------------------------------------------------

PEERS = ("optimum", "transformers", "genai", "llamacpp")


@dataclass
class PeerRow:
    """Medians (and min-max spread) of one contender at one batch size; ``error`` when it could not run."""

    contender: str
    batch: int
    runs: int
    ttft_ms: float = 0.0
    decode_tok_s: float = 0.0
    total_tok_s: float = 0.0
    e2e_ms: float = 0.0
    peak_rss_bytes: int = 0
    spread: dict[str, tuple[float, float]] | None = None
    error: str = ""
    #: what the contender ran with: intra-op and inter-op threads, spinning (read back where it can say)
    settings: dict[str, Any] | None = None


def memory_bandwidth(threads: int | None = None, size_mb: int = 256) -> float:
    """Bytes per second this host reads weights at: batch-1 products with ``size_mb`` of fp32
    weights (far past the caches) on onnxruntime with ``threads`` intra-op threads (None: its
    default, one per physical core), spinning on: x @ W in three shapes and x @ W.T, the best of
    six runs each, the best shape. That is decode's own access pattern and kernels, read-only.
    A one-thread numpy copy, the probe before, counted 2 bytes a byte copied where the hardware
    moves 3 (the write allocates) and used one core: 28 GB/s on a 2-core host where these read
    32-39 (by shape), and a 0.6B decode measured at 137% of its "bound"."""
    import time

    import onnxruntime as ort
    from onnx import TensorProto, helper

    from nextoken.device import session_options

    elements = size_mb * (1 << 20) // 4
    weights = np.random.default_rng(0).standard_normal(elements, dtype=np.float32)
    x = np.ones((1, 32768), dtype=np.float32)
    best = float("inf")
    for k, transposed in ((8192, False), (1024, False), (32768, False), (2048, True)):
        n = elements // k
        w = weights[: k * n].reshape((n, k) if transposed else (k, n))
        node = (
            helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
            if transposed
            else helper.make_node("MatMul", ["x", "w"], ["y"])
        )
        graph = helper.make_graph(
            [node],
            "gemv",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k]),
                helper.make_tensor_value_info("w", TensorProto.FLOAT, list(w.shape)),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        session = ort.InferenceSession(
            model.SerializeToString(), session_options(threads, spin=True), providers=["CPUExecutionProvider"]
        )
        feeds = {"x": x[:, :k], "w": w}
        for _ in range(6):
            t = time.perf_counter()
            session.run(None, feeds)
            best = min(best, (time.perf_counter() - t) / w.nbytes)
    return 1 / best


def _cache() -> Path:
    return Path(os.environ.get("NEXTOKEN_CACHE", Path.home() / ".cache" / "nextoken")).expanduser()


def _slug(checkpoint: str) -> str:
    """A peer's cache name for ``checkpoint``: what it is, not only where (see ``cache_key``)."""
    from nextoken.exporters.hf import cache_key

    return cache_key(checkpoint, exporter=False)


def _prepare(
    contender: str,
    checkpoint: str,
    package: Path,
    peers_venv: Path | None,
    say,
    precision: str = "fp32",
    block: int | None = None,
) -> tuple[list[str], str]:
    """(command prefix, model path) to run ``contender`` (quantised weights in blocks of ``block``);
    raises RuntimeError saying why it cannot run."""
    script = str(Path(__file__).with_name("peers.py"))
    if contender == "nextoken":
        return [sys.executable, script, "nextoken"], str(package)
    if precision != "fp32" and contender in ("transformers", "optimum"):
        raise RuntimeError(f"compared in fp32 only (this run is {precision})")
    if contender == "transformers":
        if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("torch") is None:
            raise RuntimeError("needs torch and transformers: pip install 'nextoken[export]'")
        return [sys.executable, script, "transformers"], checkpoint
    if contender == "optimum":
        if importlib.util.find_spec("optimum") is None:
            raise RuntimeError("needs optimum: pip install 'nextoken[export]'")
        target = _cache() / "peers" / "optimum" / _slug(checkpoint)
        if not (target / "model.onnx").is_file():
            say(f"exporting {checkpoint} with optimum for the optimum contender ...")
            from optimum.exporters.onnx import main_export

            main_export(checkpoint, target, task="text-generation-with-past", do_validation=False)
        return [sys.executable, script, "optimum"], str(target)
    if contender == "genai":
        python = (peers_venv or _cache() / "peers" / "genai-venv") / "bin" / "python"
        if not python.is_file():
            raise RuntimeError(
                f"needs onnxruntime-genai in its own virtual environment ({python.parent.parent}): it depends on the "
                "CPU onnxruntime package, which breaks onnxruntime-gpu when they share one. Create it with: "
                f"python3 -m venv {python.parent.parent} && {python.parent}/pip install onnxruntime-genai "
                "onnx-ir torch 'transformers>=5'"
            )
        kind = precision if block in (None, 32) else f"{precision}-b{block}"  # the builder's default blocks: 32
        target = _cache() / "peers" / "genai" / kind / _slug(checkpoint)
        if not (target / "genai_config.json").is_file():
            from nextoken.exporters.genai import run_builder

            say(f"building {checkpoint} with onnxruntime-genai's model builder ({kind}, cpu) ...")
            try:
                run_builder(python, checkpoint, target, precision, block_size=block)
            except NextokenError as exc:
                raise RuntimeError(str(exc)) from None
        return [str(python), script, "genai"], str(target)
    if contender == "llamacpp":
        if block not in (None, 32):
            raise RuntimeError(f"llama.cpp's q8_0 and q4_0 hold blocks of 32 weights, not {block}")
        venv = peers_venv or _cache() / "peers" / "llamacpp-venv"
        python = venv / "bin" / "python"
        probe = (
            subprocess.run([str(python), "-c", "import llama_cpp, gguf, safetensors"], capture_output=True, text=True)
            if python.is_file()
            else None
        )
        if probe is None or probe.returncode != 0:
            raise RuntimeError(
                f"needs llama-cpp-python, gguf and safetensors in a virtual environment of its own ({venv}): "
                f"python3 -m venv {venv} && {venv}/bin/pip install llama-cpp-python gguf safetensors numpy "
                "(llama-cpp-python compiles llama.cpp: minutes)"
            )
        kind = {"fp32": "f32", "int8": "q8_0", "int4": "q4_0"}[precision]
        target = _cache() / "peers" / "llamacpp" / _slug(checkpoint) / f"model-{kind}.gguf"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            say(f"converting {checkpoint} to GGUF ({kind}) for llama.cpp ...")
            done = subprocess.run(
                [str(python), script, "convert-gguf", "--model", checkpoint, "--out", str(target), "--type", kind],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise RuntimeError(f"GGUF conversion failed: {tail[0][:200]}")
        return [str(python), script, "llamacpp"], str(target)
    raise RuntimeError(f"unknown contender {contender!r}; known: nextoken, {', '.join(PEERS)}")


@dataclass
class CompareReport:
    checkpoint: str
    package: str
    prompt_tokens: int
    new_tokens: int
    threads: int | None
    spin: bool
    weights_bytes: int
    bandwidth_bytes_per_s: float
    rows: list[PeerRow]
    precision: str = "fp32"
    block_size: int | None = None  # the quantised weights' blocks, every contender's

    @property
    def bound_tok_s(self) -> float:
        """Batch-1 decode can go no faster than reading every weight once per token."""
        return self.bandwidth_bytes_per_s / self.weights_bytes if self.weights_bytes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            **{k: v for k, v in asdict(self).items() if k != "rows"},
            "bound_tok_s": self.bound_tok_s,
            "rows": [asdict(r) for r in self.rows],
        }

    def table(self) -> str:
        lines = [
            f"{self.checkpoint} ({self.precision}{f', blocks of {self.block_size}' if self.block_size else ''}): "
            f"prompt {self.prompt_tokens}, {self.new_tokens} new tokens, threads "
            f"{self.threads or 'default'}, spin {'on' if self.spin else 'off'}; medians [min-max]",
            f"weights read at {self.bandwidth_bytes_per_s / 1e9:.1f} GB/s (batch-1 MatMuls, same threads, best of "
            f"before and after), "
            f"nextoken's weights "
            f"{self.weights_bytes / 1e6:.0f} MB: batch-1 decode bound ~{self.bound_tok_s:.1f} tok/s",
            f"{'contender':13} {'batch':>5} {'TTFT ms':>18} {'tok/s/seq':>18} {'tok/s total':>11} "
            f"{'e2e ms':>9} {'peak MB':>8} {'of bound':>8}",
        ]
        for r in self.rows:
            if r.error:
                lines.append(f"{r.contender:13} {r.batch:>5}  not run: {r.error}")
                continue
            sp = r.spread or {}
            # the bound is nextoken's weights read once a token: a peer's graph may hold fewer bytes
            bound = (
                f"{100 * r.decode_tok_s / self.bound_tok_s:.0f}%"
                if r.batch == 1 and self.bound_tok_s and r.contender == "nextoken"
                else ""
            )
            ttft = f"{r.ttft_ms:.1f} [{sp['ttft_ms'][0]:.0f}-{sp['ttft_ms'][1]:.0f}]"
            tps = f"{r.decode_tok_s:.1f} [{sp['decode_tok_s'][0]:.1f}-{sp['decode_tok_s'][1]:.1f}]"
            lines.append(
                f"{r.contender:13} {r.batch:>5} {ttft:>18} {tps:>18} {r.total_tok_s:>11.1f} "
                f"{r.e2e_ms:>9.0f} {r.peak_rss_bytes / 1e6:>8.0f} {bound:>8}"
            )
        lines.append("each contender's effective settings (read back from it, or as set where it cannot say):")
        seen = set()
        for r in self.rows:
            if r.settings and r.contender not in seen:
                seen.add(r.contender)
                st = r.settings
                seen_threads = (
                    f"; loading it started {st['threads_started']} threads" if "threads_started" in st else ""
                )
                lines.append(
                    f"  {r.contender:11} intra-op threads {st.get('intra_op_threads')}, inter-op threads "
                    f"{st.get('inter_op_threads')}, spinning {st.get('spinning')}"
                    f" ({'read back' if st.get('read_back') else 'as set'}{seen_threads})"
                )
        return "\n".join(lines)


def plot_compare(report: "CompareReport", path: str | Path) -> Path:
    """Draw ``report`` as a PNG people can read at a glance: total decode tokens/s and time to first
    token, by contender, grouped by batch size (matplotlib: ``pip install 'nextoken[plot]'``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise NextokenError("--plot needs matplotlib: pip install 'nextoken[plot]'") from None
    rows = [r for r in report.rows if not r.error]
    if not rows:
        raise NextokenError("nothing to plot: no contender ran")
    contenders = list(dict.fromkeys(r.contender for r in rows))
    batches = sorted({r.batch for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    width = 0.8 / len(contenders)
    for ax, key, title in (
        (axes[0], "total_tok_s", "decode tokens/s (all sequences; higher is better)"),
        (axes[1], "ttft_ms", "time to first token, ms (lower is better)"),
    ):
        for i, name in enumerate(contenders):
            values = [
                next((getattr(r, key) for r in rows if r.contender == name and r.batch == b), 0.0) for b in batches
            ]
            bars = ax.bar([j + i * width for j in range(len(batches))], values, width, label=name)
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
        ax.set_xticks([j + width * (len(contenders) - 1) / 2 for j in range(len(batches))])
        ax.set_xticklabels([f"batch {b}" for b in batches])
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=9)
    fig.suptitle(
        f"{Path(report.checkpoint).name} ({report.precision}), prompt {report.prompt_tokens}, "
        f"{report.new_tokens} new tokens, {report.threads} threads, spin {'on' if report.spin else 'off'}",
        fontsize=10,
    )
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_compare(
    model: str,
    contenders: Sequence[str],
    batches: Sequence[int] = (1, 8),
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    threads: int | None = None,
    spin: bool = False,
    repeat: int = 3,
    peers_venv: str | None = None,
    precision: str = "fp32",
    checkpoint: str | None = None,
    progress=None,
    block_size: int | None = None,
) -> CompareReport:
    """Run nextoken and each of ``contenders`` from the same checkpoint, each in its own process,
    alternating, ``repeat`` times per batch size; medians and spread. ``precision`` int8/int4
    quantises nextoken's package (``nextoken export --quantize``) and builds genai's at the same
    precision, both in blocks of ``block_size`` weights (None: 32); transformers and optimum run in
    fp32 only. ``checkpoint``: where the peers start from, when ``model`` is a package that does not
    record it (e.g. one from ``import-genai``)."""
    from nextoken.exporters.hf import cache_key
    from nextoken.exporters.quantize import DEFAULT_BLOCK_SIZE

    from ..manifest import Manifest

    say = progress or (lambda _m: None)
    threads = threads or os.cpu_count() or 1  # one explicit count for every contender, never each one's default
    block = None if precision == "fp32" else block_size or DEFAULT_BLOCK_SIZE
    # a package at another block size is another package (its own cache entry)
    key = precision if block in (None, DEFAULT_BLOCK_SIZE) else f"{precision}-b{block}"
    path = Path(model).expanduser()
    if (path / "nextoken.json").is_file():
        manifest = Manifest.load(path)
        package, checkpoint = path, checkpoint or manifest.source
        if precision != manifest.precision or (block and (manifest.quantization or {}).get("block_size") != block):
            package = _cache() / "packages" / cache_key(checkpoint, key)
    else:
        checkpoint = str(model)
        package = _cache() / "packages" / cache_key(checkpoint, key)
    if not (package / "nextoken.json").is_file():
        from nextoken.exporters import export

        export(
            checkpoint,
            package,
            progress=say,
            quantize=None if precision == "fp32" else precision,
            block_size=block or DEFAULT_BLOCK_SIZE,
        )
    if not checkpoint:
        raise InvalidRequestError(f"{package} does not record its source checkpoint; give the checkpoint instead")
    weights = sum(p.stat().st_size for p in package.iterdir() if p.name.startswith("model.onnx"))
    names = ["nextoken"] + [c for c in contenders if c != "nextoken"]
    prepared: dict[str, tuple[list[str], str] | str] = {}
    for name in names:
        try:
            prepared[name] = _prepare(
                name, checkpoint, package, Path(peers_venv) if peers_venv else None, say, precision, block
            )
        except RuntimeError as exc:
            prepared[name] = str(exc)
            say(f"{name}: not run: {exc}")
        except Exception as exc:  # a peer's own failure must not stop the others
            prepared[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            say(f"{name}: not run: {prepared[name]}")
    results: dict[tuple[str, int], list[dict]] = {}
    errors: dict[tuple[str, int], str] = {}
    runnable = [n for n in names if not isinstance(prepared[n], str)]
    # read before the runs and after them, the faster kept: on a shared host one probe alone read
    # 33 GB/s where the decode then ran at 35
    bandwidth = memory_bandwidth(threads)
    total = len(runnable) * len(batches) * repeat
    done = 0
    for rep in range(repeat):
        for batch in batches:
            for name in runnable:  # alternating: one run of each in turn
                done += 1
                say(f"[{done}/{total}] {name} batch {batch} (run {rep + 1}/{repeat}) ...")
                if (name, batch) in errors:
                    continue
                entry = prepared[name]
                assert not isinstance(entry, str)  # runnable
                cmd, target = entry
                argv = (
                    cmd
                    + [
                        "--model",
                        target,
                        "--batch",
                        str(batch),
                        "--prompt",
                        str(prompt_tokens),
                        "--new",
                        str(new_tokens),
                        "--threads",
                        str(threads),
                    ]
                    + (["--spin"] if spin else [])
                )
                out = subprocess.run(argv, capture_output=True, text=True)
                if out.returncode != 0:
                    tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
                    errors[(name, batch)] = tail[0][:200]
                    continue
                results.setdefault((name, batch), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    rows = []
    for batch in batches:
        for name in names:
            entry = prepared[name]
            if isinstance(entry, str):
                rows.append(PeerRow(name, batch, 0, error=entry))
            elif (name, batch) in errors:
                rows.append(PeerRow(name, batch, 0, error=errors[(name, batch)]))
            else:
                runs = results[(name, batch)]
                keys = ("ttft_ms", "decode_tok_s", "total_tok_s", "e2e_ms")
                med = {k: statistics.median(r[k] for r in runs) for k in keys}
                spread = {k: (min(r[k] for r in runs), max(r[k] for r in runs)) for k in keys}
                rows.append(
                    PeerRow(
                        name,
                        batch,
                        len(runs),
                        med["ttft_ms"],
                        med["decode_tok_s"],
                        med["total_tok_s"],
                        med["e2e_ms"],
                        int(statistics.median(r["peak_rss_bytes"] for r in runs)),
                        spread,
                        settings=runs[0].get("settings"),
                    )
                )
    return CompareReport(
        checkpoint,
        str(package),
        prompt_tokens,
        new_tokens,
        threads,
        spin,
        weights,
        max(bandwidth, memory_bandwidth(threads)),
        rows,
        precision,
        block,
    )
