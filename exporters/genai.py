"""Import a model folder built by onnxruntime-genai's model builder as a nextoken package.

The builder's graphs use onnxruntime's fused operators (GroupQueryAttention with rotary inside,
SkipSimplifiedLayerNormalization, one QKV MatMul) and run in plain onnxruntime. On a 135M-parameter
Llama they ran 1.5x faster than the optimum graph through nextoken's loop. They take no
position_ids: GroupQueryAttention reads each row's positions and where its keys go from the
attention mask's row sums, so their batches are padded on the right (``padding_side: right``).

The builder itself lives in onnxruntime-genai, which must stay out of an onnxruntime-gpu
environment; build in its own virtual environment, then import here:

    python -m onnxruntime_genai.models.builder -m CHECKPOINT -o BUILT -p fp32 -e cpu
    nextoken import-genai BUILT -o PACKAGE
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nextoken.errors import ExportError
from nextoken.manifest import MANIFEST_NAME, Manifest

__all__ = ["build_with_genai", "import_genai", "run_builder"]

_COPY = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "genai_config.json",
    "chat_template.jinja",
    "config.json",
)


def import_genai(source: str | Path, output: str | Path) -> Manifest:
    """Make a nextoken package at ``output`` from the genai-built folder ``source``."""
    import onnx

    source, output = Path(source).expanduser(), Path(output).expanduser()
    config_path = source / "genai_config.json"
    if not config_path.is_file():
        raise ExportError(f"{source} is not an onnxruntime-genai model folder: it has no genai_config.json")
    try:
        config = json.loads(config_path.read_text())["model"]
        decoder = config["decoder"]
        filename = decoder.get("filename", "model.onnx")
    except (ValueError, KeyError, TypeError) as exc:
        raise ExportError(f"{config_path} is not a genai config this importer understands ({exc})") from None
    if not (source / filename).is_file():
        raise ExportError(f"{source / filename} is missing")
    names = {**decoder.get("inputs", {}), **decoder.get("outputs", {})}
    expected = {
        "past_key_names": "past_key_values.%d.key",
        "past_value_names": "past_key_values.%d.value",
        "present_key_names": "present.%d.key",
        "present_value_names": "present.%d.value",
    }
    for key, name in expected.items():
        if names.get(key, name) != name:
            raise ExportError(f"genai_config names its KV tensors {names[key]!r}; nextoken reads {name!r}")
    graph = onnx.load(str(source / filename), load_external_data=False).graph
    head = int(decoder.get("head_size", 0))
    if any(n.op_type == "GroupQueryAttention" for n in graph.node) and head % 16:
        raise RouteUnavailable(
            f"onnxruntime's GroupQueryAttention needs a head size that is a multiple of 16, and this "
            f"model's is {head}; export it with the optimum backend"
        )
    if output.exists() and any(output.iterdir()) and not (output / MANIFEST_NAME).exists():
        raise ExportError(f"output {output} exists and is not an empty directory or a nextoken package; choose another")
    from .package import staged

    final = output
    with staged(final) as output:
        output.mkdir()
        for p in source.iterdir():
            if p.is_file() and (p.name.startswith(filename) or p.name in _COPY):
                shutil.copy2(p, output / p.name)
        inputs = [i.name for i in graph.input]
        past = [i for i in graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
        if not past:
            raise ExportError(f"{filename} has no past_key_values inputs")
        elem = past[0].type.tensor_type.elem_type
        kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
        ops = {n.op_type for n in graph.node}
        logits = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim
        vocab = logits[-1].dim_value if logits[-1].HasField("dim_value") else int(config["vocab_size"])
        eos = config.get("eos_token_id", [])
        manifest = Manifest(
            architecture=str(config.get("type", "unknown")),
            num_layers=len(past),
            num_kv_heads=int(decoder["num_key_value_heads"]),
            head_dim=int(decoder["head_size"]),
            kv_dtype=kv_dtype,
            vocab_size=int(vocab),
            context_length=int(config["context_length"]),
            inputs=tuple(inputs),
            outputs=tuple(o.name for o in graph.output),
            eos_token_ids=tuple(int(e) for e in (eos if isinstance(eos, list) else [eos])),
            bos_token_id=config.get("bos_token_id"),
            pad_token_id=config.get("pad_token_id"),
            precision="int4" if "MatMulNBits" in ops else ("fp16" if kv_dtype == "float16" else "fp32"),
            model_file=filename,
            tokenizer_file="tokenizer.json" if (output / "tokenizer.json").is_file() else None,
            source=str(source),
            exported_by={"onnxruntime-genai model builder": "imported by nextoken"},
            padding_side="left" if "position_ids" in inputs else "right",
        ).with_files(output)
        manifest.save(output)
    return manifest


class RouteUnavailable(ExportError):
    """The genai route does not apply to this model (the builder cannot build it, or onnxruntime
    cannot run what it built): ``export`` falls back to the plain optimum graph with a warning."""


def run_builder(
    python: str | Path,
    source: str,
    target: Path,
    precision: str = "fp32",
    execution_provider: str = "cpu",
    block_size: int | None = None,
) -> None:
    """Run onnxruntime-genai's model builder with ``python`` (its own environment's) into ``target``
    (graphs at ``precision`` for ``execution_provider``: cpu or cuda; quantised weights in blocks of
    ``block_size``, None: the builder's 32); a failure is an :class:`ExportError` with the builder's
    last line."""
    import subprocess

    done = subprocess.run(
        [
            str(python),
            "-m",
            "onnxruntime_genai.models.builder",
            "-m",
            str(source),
            "-o",
            str(target),
            "-p",
            precision,
            "-e",
            execution_provider,
        ]
        + (["--extra_options", f"block_size={block_size}"] if block_size and precision != "fp32" else []),
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RouteUnavailable(f"onnxruntime-genai's model builder failed: {tail[0][:300]}")


def build_with_genai(
    source: str,
    output: Path,
    genai_python: str | None,
    precision: str = "fp32",
    check: bool = True,
    atol: float = 1e-3,
    say=print,
):
    """Run onnxruntime-genai's model builder with ``genai_python`` (an interpreter of its own virtual
    environment) on ``source``, import the result into ``output``, and check fp32 parity with PyTorch."""
    import tempfile
    import time

    from .package import ExportReport, parity_check, record_parity

    if not genai_python or not Path(genai_python).is_file():
        raise ExportError(
            "the genai backend needs --genai-python: the python of a virtual environment with onnxruntime-genai "
            "(python3 -m venv VENV && VENV/bin/pip install onnxruntime-genai onnx-ir torch 'transformers>=5'); "
            "onnxruntime-genai must not share an environment with onnxruntime-gpu"
        )
    if precision not in ("fp32", "int4"):
        raise ExportError(f"the genai backend builds fp32 or int4, not {precision}")
    seconds: dict[str, float] = {}
    work = Path(tempfile.mkdtemp(prefix=".nextoken-genai-", dir=output.parent if output.parent.exists() else None))
    try:
        say(f"[1/3] building {source} with onnxruntime-genai's model builder ({precision}, cpu) ...")
        start = time.perf_counter()
        run_builder(genai_python, source, work / "built", precision)
        seconds["build"] = round(time.perf_counter() - start, 3)
        say("[2/3] importing the build ...")
        manifest = import_genai(work / "built", output)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    diff, n = float("nan"), 0
    if check and precision == "fp32":
        say("[3/3] checking ONNX logits against PyTorch ...")
        diff, n, _, _ = parity_check(str(source), output)
        if not diff <= atol:
            raise ExportError(
                f"parity check failed: max |Δ logits| between the genai graph and PyTorch is {diff:.3e}, "
                f"over the tolerance {atol:.0e}"
            )
        manifest = record_parity(output, manifest, diff, atol, n, "cpu")
    report = ExportReport(output, manifest, diff, atol, n, seconds)
    say(report.summary())
    return report
