"""One contender's run for ``nextoken bench --compare``, in its own process and interpreter.

Self-contained (standard library plus the contender's own packages), so it runs under a peer's
virtual environment too: ``python peers.py RUNNER --model PATH --batch B --prompt P --new N
--threads T [--spin]``; every contender runs with those intra-op threads, one inter-op thread,
and that spinning policy, and reports the settings it ran with (read back from the contender
where it can say). ``python peers.py convert-gguf --model CKPT --out FILE --type f32|q8_0|q4_0``
writes a Llama checkpoint as GGUF for the llama.cpp contender. Prints one JSON object: time to first token, decode tokens/s per sequence and in
total, end-to-end time, peak resident memory, and ``settings``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _peak_rss() -> int:
    # nextoken.tools.memory has the same reading, but this file must not import nextoken (foreign venvs).
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


def _result(ttft: float, total: float, batch: int, new: int, settings: dict) -> dict:
    decode = total - ttft
    per_seq = (new - 1) / decode if decode > 0 else 0.0
    return {
        "ttft_ms": ttft * 1e3,
        "decode_tok_s": per_seq,
        "total_tok_s": per_seq * batch,
        "e2e_ms": total * 1e3,
        "peak_rss_bytes": _peak_rss(),
        "settings": settings,
    }


def _os_threads() -> int:
    """Threads of this process (Linux), -1 where the OS does not say."""
    import os

    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return -1


def _ort_settings(options) -> dict:
    """What an onnxruntime session ran with, read back from its SessionOptions."""

    def entry(key: str) -> str:
        try:
            return options.get_session_config_entry(key)
        except Exception:
            return "default"

    return {
        "intra_op_threads": options.intra_op_num_threads,
        "inter_op_threads": options.inter_op_num_threads,
        "spinning": entry("session.intra_op.allow_spinning"),
        "read_back": True,
    }


def _ort_options(a):
    """onnxruntime SessionOptions with the comparison's threads and spinning policy."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = a.threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if a.spin else "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "1" if a.spin else "0")
    return options


def run_nextoken(a) -> dict:
    import nextoken

    with nextoken.Engine(a.model, device="cpu", threads=a.threads, spin=a.spin) as engine:
        prompts = _prompts(engine.manifest.vocab_size, a.batch, a.prompt)
        engine.generate(prompts, max_new_tokens=2, ignore_eos=True)  # warm-up
        gen = engine.start(prompts, max_new_tokens=a.new, ignore_eos=True)
        engine.complete(gen)
        end = time.perf_counter()
        settings = _ort_settings(engine.session.get_session_options())
        t = gen.timings()
        return _result(t.first_token - t.start, end - t.start, a.batch, a.new, settings)


def _hf_generate(model, prompts, new, torch):
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(ids, attention_mask=mask, max_new_tokens=2, **kwargs)  # warm-up
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

    torch.set_num_threads(a.threads)
    torch.set_num_interop_threads(1)
    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32).eval()
    with torch.no_grad():
        ttft, total = _hf_generate(model, _prompts(vocab, a.batch, a.prompt), a.new, torch)
    settings = {
        "intra_op_threads": torch.get_num_threads(),
        "inter_op_threads": torch.get_num_interop_threads(),
        "spinning": "n/a (PyTorch)",
        "read_back": True,
    }
    return _result(ttft, total, a.batch, a.new, settings)


def run_optimum(a) -> dict:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(a.model).vocab_size
    model = ORTModelForCausalLM.from_pretrained(
        a.model, use_cache=True, use_io_binding=True, session_options=_ort_options(a), provider="CPUExecutionProvider"
    )
    ttft, total = _hf_generate(model, _prompts(vocab, a.batch, a.prompt), a.new, torch)
    session = getattr(model, "session", None) or getattr(model, "model", None)
    settings = (
        _ort_settings(session.get_session_options())
        if session is not None and hasattr(session, "get_session_options")
        else {}
    )
    return _result(ttft, total, a.batch, a.new, settings)


def run_genai(a) -> dict:
    import onnxruntime_genai as og

    # genai's session options come from genai_config.json; the overlay sets the comparison's.
    options = {
        "intra_op_num_threads": a.threads,
        "inter_op_num_threads": 1,
        "session.intra_op.allow_spinning": "1" if a.spin else "0",
        "session.inter_op.allow_spinning": "1" if a.spin else "0",
    }
    og_config = og.Config(a.model)
    og_config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    before = _os_threads()
    model = og.Model(og_config)
    started = _os_threads() - before  # measured here: n for an intra-op pool of n (n - 1 workers and one more)
    config = json.loads(Path(a.model, "genai_config.json").read_text())
    vocab = config["model"]["vocab_size"]
    prompts = _prompts(vocab, a.batch, a.prompt)

    def once(new: int) -> tuple[float, float]:
        params = og.GeneratorParams(model)
        params.set_search_options(
            max_length=a.prompt + new, min_length=a.prompt + new, batch_size=a.batch, do_sample=False
        )
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
    # genai reports no session options: these are what its overlay set, with the intra-op threads
    # its session started (seen by the OS) as evidence that the overlay took effect
    settings = {
        "intra_op_threads": a.threads,
        "inter_op_threads": 1,
        "spinning": options["session.intra_op.allow_spinning"],
        "read_back": False,
    }
    if before >= 0:
        settings["threads_started"] = started
    return _result(ttft, total, a.batch, a.new, settings)


def run_llamacpp(a) -> dict:
    if a.batch != 1:
        raise SystemExit("llama-cpp-python generates one sequence at a time: batch 1 only")
    from llama_cpp import Llama

    llm = Llama(
        model_path=a.model,
        n_ctx=a.prompt + a.new + 8,
        n_batch=max(a.prompt, 32),
        n_threads=a.threads,
        n_threads_batch=a.threads,
        verbose=False,
    )
    prompt = _prompts(llm.n_vocab(), 1, a.prompt)[0]

    def once(new: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        ttft = None
        for i, _token in enumerate(llm.generate(prompt, top_k=1, temp=0.0, reset=True)):
            if ttft is None:
                ttft = time.perf_counter() - start
            if i + 1 >= new:
                break
        return ttft or 0.0, time.perf_counter() - start

    once(2)
    ttft, total = once(a.new)
    params = getattr(llm, "context_params", None)
    threads = getattr(params, "n_threads", None)
    settings = {
        "intra_op_threads": threads if threads is not None else a.threads,
        "inter_op_threads": "n/a",
        "spinning": "llama.cpp's own",
        "read_back": threads is not None,
    }
    return _result(ttft, total, 1, a.new, settings)


def convert_gguf(checkpoint: str, out: str, kind: str, threads: int = 0) -> None:
    """Write a Llama transformers checkpoint as GGUF (f32, or quantised to q8_0 / q4_0 by llama.cpp).

    The vocabulary is a placeholder of the model's size (token ids are what the bench feeds), and
    q/k are permuted to llama.cpp's rotary layout as its own converter does.
    """
    import os

    import gguf
    import numpy as np
    from safetensors.numpy import load_file

    config = json.loads(Path(checkpoint, "config.json").read_text())
    if config.get("model_type") not in ("llama", "mistral"):
        raise SystemExit(f"the GGUF conversion here handles Llama-style models, not {config.get('model_type')}")
    weights: dict = {}
    for name in sorted(os.listdir(checkpoint)):
        if name.endswith(".safetensors"):
            weights.update(load_file(os.path.join(checkpoint, name)))
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"])
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or hidden // heads

    def permute(w, n):
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    f32 = out if kind == "f32" else out + ".f32.tmp"
    writer = gguf.GGUFWriter(f32, "llama")
    writer.add_name(os.path.basename(os.path.normpath(checkpoint)))
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(vocab)
    writer.add_file_type(0)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(len(tokens), vocab)]
    types = [2, 3, 3] + [6] * 256 + [1] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[:vocab])
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types[:vocab])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    parts = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for name, tensor in weights.items():
        tensor = np.ascontiguousarray(tensor.astype(np.float32))
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            module = rest.rsplit(".", 1)[0]
            if module == "self_attn.q_proj":
                tensor = permute(tensor, heads)
            elif module == "self_attn.k_proj":
                tensor = permute(tensor, kv_heads)
            target = f"blk.{layer}.{parts[module]}.weight"
        else:
            target = names[name]
        writer.add_tensor(target, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if kind != "f32":
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
        params.nthread = threads
        if llama_cpp.llama_model_quantize(f32.encode(), out.encode(), params) != 0:
            raise SystemExit(f"llama.cpp could not quantise {f32} to {kind}")
        os.remove(f32)


RUNNERS = {
    "nextoken": run_nextoken,
    "transformers": run_transformers,
    "optimum": run_optimum,
    "genai": run_genai,
    "llamacpp": run_llamacpp,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert-gguf"]:
        c = argparse.ArgumentParser(prog="peers.py convert-gguf")
        c.add_argument("--model", required=True)
        c.add_argument("--out", required=True)
        c.add_argument("--type", choices=("f32", "q8_0", "q4_0"), default="f32")
        c.add_argument("--threads", type=int, default=0)
        ca = c.parse_args(argv[1:])
        convert_gguf(ca.model, ca.out, ca.type, ca.threads)
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("runner", choices=sorted(RUNNERS))
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--threads", type=int, required=True, help="intra-op threads, the same for every contender")
    p.add_argument("--spin", action="store_true")
    a = p.parse_args(argv)
    if a.threads < 1:
        p.error("--threads must be >= 1: every contender gets the same explicit thread count")
    print(json.dumps(RUNNERS[a.runner](a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
