"""One contender's run for ``nextoken bench --compare``, in its own process and interpreter.

Self-contained (standard library plus the contender's own packages), so it runs under a peer's
virtual environment too: ``python peers.py RUNNER --model PATH --batch B --prompt P --new N
--threads T``. Prints one JSON object: time to first token, decode tokens/s per sequence and in
total, end-to-end time, peak resident memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def _peak_rss() -> int:
    # nextoken.memory has the same reading, but this file must not import nextoken (foreign venvs).
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _prompts(vocab: int, batch: int, length: int) -> list[list[int]]:
    import random

    rng = random.Random(0)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


def _result(ttft: float, total: float, batch: int, new: int) -> dict:
    decode = total - ttft
    per_seq = (new - 1) / decode if decode > 0 else 0.0
    return {"ttft_ms": ttft * 1e3, "decode_tok_s": per_seq, "total_tok_s": per_seq * batch,
            "e2e_ms": total * 1e3, "peak_rss_bytes": _peak_rss()}


def run_nextoken(a) -> dict:
    import nextoken

    with nextoken.Engine(a.model, device="cpu", threads=a.threads, spin=a.spin) as engine:
        prompts = _prompts(engine.manifest.vocab_size, a.batch, a.prompt)
        engine.generate(prompts, max_new_tokens=2, ignore_eos=True)                     # warm-up
        gen = engine.start(prompts, max_new_tokens=a.new, ignore_eos=True)
        gen.completions()
        end = time.perf_counter()
        return _result(gen.first_token_time - gen.start, end - gen.start, a.batch, a.new)


def _hf_generate(model, prompts, new, torch):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)                 # warm-up
    start = time.perf_counter()
    model.generate(ids, attention_mask=mask, max_new_tokens=1, **kwargs)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, **kwargs)
    total = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new
    return ttft, total


def run_transformers(a) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.set_num_threads(a.threads or torch.get_num_threads())
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with torch.no_grad():
        ttft, total = _hf_generate(model, _prompts(vocab, a.batch, a.prompt), a.new, torch)
    return _result(ttft, total, a.batch, a.new)


def run_optimum(a) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig

    options = ort.SessionOptions()
    if a.threads:
        options.intra_op_num_threads = a.threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if a.spin else "0")
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    model = ORTModelForCausalLM.from_pretrained(a.model, use_cache=True, use_io_binding=True,
                                                session_options=options, provider="CPUExecutionProvider")
    ttft, total = _hf_generate(model, _prompts(vocab, a.batch, a.prompt), a.new, torch)
    return _result(ttft, total, a.batch, a.new)


def run_genai(a) -> dict:
    import onnxruntime_genai as og

    model = og.Model(a.model)
    config = json.load(open(f"{a.model}/genai_config.json"))
    vocab = config["model"]["vocab_size"]
    prompts = _prompts(vocab, a.batch, a.prompt)

    def once(new: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=a.prompt + new, min_length=a.prompt + new, batch_size=a.batch,
                                  do_sample=False)
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompts)
        ttft = None
        while not generator.is_done():
            generator.generate_next_token()
            if ttft is None:
                ttft = time.perf_counter() - start
        return ttft or 0.0, time.perf_counter() - start

    once(2)
    ttft, total = once(a.new)
    return _result(ttft, total, a.batch, a.new)


RUNNERS = {"nextoken": run_nextoken, "transformers": run_transformers, "optimum": run_optimum, "genai": run_genai}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("runner", choices=sorted(RUNNERS))
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--spin", action="store_true")
    a = p.parse_args(argv)
    print(json.dumps(RUNNERS[a.runner](a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
