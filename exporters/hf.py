"""Export a Hugging Face causal LM into a nextoken model package (nextoken's builder by default,
optimum's exporter, task ``text-generation-with-past``, for what it does not cover), then check
the ONNX logits against PyTorch."""

from __future__ import annotations

import json
import logging
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nextoken.dtypes import DTYPES as ELEMENT_TYPES
from nextoken.dtypes import QUANTISED_KV
from nextoken.errors import ExportError
from nextoken.manifest import MANIFEST_NAME, Manifest

from .builder import ARCHITECTURES
from .package import (
    DEFAULT_ATOL,
    FP16_RTOL,
    PACKAGE_FILES,
    PARITY_PROMPT,
    ExportReport,
    Progress,
    Stages,
    checked_parity,
    eos_ids,
    export_versions,
    say,
    staged,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_ATOL",
    "DTYPES",
    "FP16_RTOL",
    "SUPPORTED_ARCHITECTURES",
    "TASK",
    "ExportReport",
    "cache_key",
    "export",
]

TASK = "text-generation-with-past"

#: Architectures tested end to end (logits and greedy tokens against transformers): the builder's
SUPPORTED_ARCHITECTURES = ARCHITECTURES

#: Where an export's graph comes from: nextoken's own builder (the default: fused operators, KV in
#: place, no torch; optimum's graph, with a note, for what it does not cover), optimum's exporter,
#: or onnxruntime-genai's builder (in a venv of its own, for comparison).
BACKENDS = ("nextoken", "optimum", "genai")

#: Weight and KV-cache precisions an export can produce directly.
DTYPES = ("fp32", "fp16")


def _require_export_stack(modules: tuple[str, ...] = ("torch", "transformers", "optimum.exporters.onnx")) -> None:
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module.split(".")[0])
    if missing:
        raise ExportError(
            f"exporting needs {', '.join(missing)}; install the export extra: pip install 'nextoken[export]'"
        )


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the tracer warnings and info logs of torch/transformers/optimum during export."""
    from optimum.utils import logging as optimum_logging

    optimum_logging.get_logger()  # optimum sets its root logger's level at its first logger: let it, then override

    loggers = [logging.getLogger(n) for n in ("transformers", "optimum", "torch.onnx", "huggingface_hub", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        import transformers

        previous = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
    except Exception:  # pragma: no cover - transformers missing is reported elsewhere
        previous = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)
            if previous is not None:
                transformers.logging.set_verbosity(previous)


def cache_key(source: str, precision: str = "fp32", exporter: bool = True) -> str:
    """The name under which an export of ``source`` at ``precision`` is cached (the demo's and the
    bench's packages, and the peers' builds): a hub id as typed, a local checkpoint by its resolved
    path and its files' names, sizes and mtimes, and (``exporter``) nextoken's exporter itself (a
    digest of this package's code), so another model at the same path, a changed checkpoint or a
    changed exporter gets a package of its own."""
    import hashlib
    import re

    path = Path(source).expanduser()
    digest = hashlib.sha256(precision.encode())
    for code in sorted(Path(__file__).parent.glob("*.py")) if exporter else ():
        digest.update(code.read_bytes())
    if not path.exists():
        name = source.strip("/")
    else:
        path = path.resolve()
        name = path.name
        digest.update(str(path).encode())
        for f in sorted(p for p in (path.iterdir() if path.is_dir() else [path]) if p.is_file()):
            st = f.stat()
            digest.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    suffix = "" if precision == "fp32" else f"-{precision}"
    return f"{re.sub(r'[^A-Za-z0-9_.-]+', '--', name)}{suffix}-{digest.hexdigest()[:12]}"


def _looks_local(source: str) -> bool:
    """A path rather than a hub id ("org/name" has at most one slash and does not start with . / ~)."""
    return Path(source).expanduser().exists() or source.startswith((".", "/", "~")) or source.count("/") > 1


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    """Whether the hub endpoint answers a TCP connection: checked once, quickly, instead of letting
    the hub client retry for half a minute on a host without network."""
    import socket
    from urllib.parse import urlparse

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    if any(
        os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    ):
        return True, endpoint  # through a proxy a direct connection says nothing; let the hub client try
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, endpoint
    except OSError as exc:
        return False, f"{endpoint} is not reachable ({exc.strerror or exc})"


def _load_config(source: str, local: bool) -> tuple[Any, bool]:
    """(config, offline): offline when a hub model must come from the local cache."""
    from transformers import AutoConfig

    if local:
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ExportError(f"checkpoint {source} does not exist (give a local checkpoint directory or a hub id)")
        if not (path / "config.json").is_file():
            raise ExportError(f"{source} is not a transformers checkpoint: it has no config.json")
        offline = False
    else:
        try:  # already in the hub cache?
            AutoConfig.from_pretrained(source, local_files_only=True)
            cached = True
        except Exception:
            cached = False
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
        if not offline:
            reachable, why = _hub_reachable()
            if not reachable:
                if not cached:
                    raise ExportError(
                        f"cannot download {source!r}: {why}. Give a local checkpoint directory, "
                        "or export on a host with network access"
                    )
                offline = True
    try:
        return AutoConfig.from_pretrained(source, local_files_only=offline), offline
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ExportError(
            f"cannot load the config of {source!r}: {first}. Check the hub id (and network access) "
            "or give a local checkpoint directory"
        ) from None


def _onnx_config(config, dtype: str = "fp32"):
    """optimum's ONNX config for ``config`` with past key values, with position_ids as an input.

    position_ids must be an input so left-padded batches get the same positions as each prompt
    alone; optimum's configs for some architectures (gemma) leave it out, so it is added.
    """
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    model_type = config.model_type
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if TASK not in tasks:
        raise ExportError(
            f"optimum cannot export {model_type!r} with past key values (task {TASK}), and nextoken's builder "
            f"covers {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    base = type(tasks[TASK](config))

    class WithPositions(base):  # type: ignore[misc, valid-type]
        @property
        def inputs(self):
            inputs = super().inputs
            inputs.setdefault("position_ids", {0: "batch_size", 1: "sequence_length"})
            return inputs

    WithPositions.__name__ = base.__name__
    return WithPositions(config, task="text-generation", use_past=True, use_past_in_inputs=True, float_dtype=dtype)


def _context_length(config) -> int:
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ExportError(f"cannot tell the context length of {config.model_type} from its config")


#: Elementwise ops that may stand between the LM head's MatMul and the logits (e.g. soft-capping).
_ELEMENTWISE = {"Mul", "Div", "Tanh", "Cast", "Add", "Sub", "Identity"}


def _keep_last_logits(model_path: Path) -> bool:
    """Make the graph compute logits only for the last ``logits_to_keep`` positions.

    optimum's graph applies the LM head to every position: at prefill that is ``[B, S, V]`` floats
    (1.6 GB for 8 x 1,024 tokens of a 49k vocabulary) of which generation needs ``[B, 1, V]``. A
    ``Slice`` on the sequence axis before the head's MatMul, driven by a new int64 input
    ``logits_to_keep`` (shape [1]), keeps what is asked: 1 to generate, S for every position.
    Returns False (graph unchanged) when the head is not a MatMul feeding the logits.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path), load_external_data=False)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    initializers = {init.name for init in graph.initializer}
    node = producers.get("logits")
    while node is not None and node.op_type in _ELEMENTWISE:
        node = next((producers[i] for i in node.input if i in producers), None)
    if node is None or node.op_type != "MatMul" or node.input[1] not in initializers:
        return False
    import numpy as np

    hidden = node.input[0]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "nextoken_keep_ends"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "nextoken_keep_axes"),
        ]
    )
    graph.input.append(helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]))
    graph.node.extend(
        [
            helper.make_node("Neg", ["logits_to_keep"], ["nextoken_keep_starts"], name="nextoken_keep_neg"),
            helper.make_node(
                "Slice",
                [hidden, "nextoken_keep_starts", "nextoken_keep_ends", "nextoken_keep_axes"],
                ["nextoken_kept_hidden"],
                name="nextoken_keep_slice",
            ),
        ]
    )
    node.input[0] = "nextoken_kept_hidden"
    # Keep the nodes in topological order: move the head after the new nodes.
    nodes = list(graph.node)
    nodes.remove(node)
    nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    for out in graph.output:
        if out.name == "logits":
            dims = out.type.tensor_type.shape.dim
            if len(dims) == 3:
                dims[1].ClearField("dim_value")
                dims[1].dim_param = "logits_to_keep"
    onnx.save(model, str(model_path))
    return True


def _manifest_from_graph(model_path: Path, config, package: Path, source: str) -> Manifest:
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    inputs = [i.name for i in graph.input]
    outputs = [o.name for o in graph.output]
    past = {i.name: i for i in graph.input if i.name.startswith("past_key_values.")}
    layers = sum(1 for n in past if n.endswith(".key"))
    if layers == 0:
        raise ExportError("the exported graph has no past_key_values inputs; it cannot use a KV cache")
    first = past["past_key_values.0.key"].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in first.shape.dim]
    kv_heads, head_dim = dims[1], dims[3]
    if kv_heads is None or head_dim is None:
        raise ExportError("the exported graph's past_key_values have no fixed KV head count and head size")
    kv_dtype = onnx.helper.tensor_dtype_to_np_dtype(first.elem_type).name
    logits = next(o for o in graph.output if o.name == "logits").type.tensor_type.shape.dim
    vocab = logits[-1].dim_value if logits[-1].HasField("dim_value") else int(config.vocab_size)
    gen_path = package / "generation_config.json"
    generation = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    bos = generation.get("bos_token_id", getattr(config, "bos_token_id", None))
    pad = generation.get("pad_token_id", getattr(config, "pad_token_id", None))
    if isinstance(bos, list):
        bos = bos[0] if bos else None
    if isinstance(pad, list):
        pad = pad[0] if pad else None
    return Manifest(
        architecture=config.model_type,
        num_layers=layers,
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        kv_dtype=kv_dtype,
        vocab_size=int(vocab),
        context_length=_context_length(config),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        eos_token_ids=eos_ids(config, generation),
        bos_token_id=None if bos is None else int(bos),
        pad_token_id=None if pad is None else int(pad),
        precision=(ELEMENT_TYPES[kv_dtype].short if kv_dtype in ELEMENT_TYPES else kv_dtype),
        model_file=model_path.name,
        tokenizer_file="tokenizer.json" if (package / "tokenizer.json").is_file() else None,
        source=source,
        exported_by=export_versions(),
    ).with_files(package)


#: Token ids the parity check adds to the prompt's, spread over the vocabulary (seeded), so the check
#: exercises many embedding rows and not only what the tokenizer makes of one sentence.
def _quantized(package: Path, manifest: Manifest, method: str, block_size: int):
    """Quantise the checked fp32 ``package`` in place; (its manifest, the accuracy against fp32)."""
    import dataclasses

    from .quantize import quantize_package

    accuracy = quantize_package(package, method, block_size, PARITY_PROMPT)
    manifest = dataclasses.replace(
        manifest,
        precision=method,
        quantization={"method": method, "block_size": block_size, **accuracy.to_dict()},
    ).with_files(package)
    manifest.save(package)
    return manifest, accuracy


def export(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    atol: float | None = None,
    check: bool = True,
    dtype: str = "fp32",
    device: str = "cpu",
    quantize: str | None = None,
    block_size: int = 32,
    backend: str = "nextoken",
    genai_python: str | None = None,
    progress: Progress | None = say,
    task: str = "generate",
    pooling: str | None = None,
    normalize: bool | None = None,
    truncatable: bool = False,
    kv_dtype: str | None = None,
    lora_adapters: int = 0,
    lora_rank: int = 16,
    lora_targets: Sequence[str] | None = None,
) -> ExportReport:
    """Export ``source`` (a hub id or a local transformers checkpoint) to the package directory ``output``.

    ``backend="nextoken"`` (the default) writes the graph with nextoken's own builder
    (:mod:`nextoken.exporters.builder`: fused operators, the KV cache written in place, padding on
    the right); for a model it does not cover it says why in one line and runs optimum's exporter,
    as ``backend="optimum"`` does: optimum's ONNX export with past key values. Either way the
    package holds model.onnx (+ external data for large models), nextoken.json, the tokenizer and
    generation config, and (``check``) the export compares the ONNX
    logits with PyTorch's (fp32, on the CPU) on a sample prompt and raises :class:`ExportError`
    beyond ``atol`` (None: 1e-3 for fp32; for fp16, :data:`FP16_RTOL` of the largest |logit|).
    ``dtype``: ``fp32`` or ``fp16`` weights and KV cache (fp16 is for CUDA; ONNX Runtime's CPU
    provider runs it through casts, slowly). ``device``: where PyTorch traces the model (``cuda``
    needs a CUDA build of PyTorch); the parity check runs the package on the same device.
    ``quantize`` (``int8`` or ``int4``, blocks of ``block_size``) then quantises the weights and
    reports their accuracy against the fp32 graph (:mod:`nextoken.exporters.quantize`).
    ``backend="genai"`` builds the fused GroupQueryAttention graph with onnxruntime-genai's model
    builder instead, run by ``genai_python`` (see :mod:`nextoken.exporters.genai`); its ``int4`` is
    the builder's. Where that route does not apply (the builder cannot build the model, or the
    head size is one GroupQueryAttention cannot run), the plain graph is exported, with a warning.
    ``progress`` gets one line per stage (None: silent).
    ``task="embed"``: an embedding package (nextoken's builder only): the hidden states pooled as
    ``pooling`` says (``last``, ``mean``, ``cls``; None: as the checkpoint's sentence-transformers
    config says, else ``last``), unit vectors unless ``normalize`` is False, ``truncatable`` when
    the model was trained for shorter vectors (Matryoshka); see :mod:`nextoken.embedding`.
    ``kv_dtype="int8"`` (``"int4"``): the KV cache in int8, a quarter of fp32's bytes (int4, an
    eighth), scales calibrated at export, its accuracy against the fp32 cache in the manifest
    (:mod:`nextoken.exporters.kvquant`).
    ``lora_adapters`` (N > 0): the graph takes up to N LoRA adapters at once, of rank up to
    ``lora_rank``, on ``lora_targets`` (of q, k, v, o, gate, up, down; None: q, k, v, o), chosen
    per row (nextoken's builder only; :mod:`nextoken.adapters`).
    """
    source = str(source)
    output = Path(output).expanduser()
    say = progress or (lambda _msg: None)
    if backend not in BACKENDS:
        raise ExportError(f"export backend {backend!r} is not known; use {', '.join(BACKENDS)}")
    if dtype not in DTYPES:
        raise ExportError(f"export dtype {dtype!r} is not supported; use {' or '.join(DTYPES)}")
    if device not in ("cpu", "cuda"):
        raise ExportError(f"export device {device!r} is not known; use cpu or cuda")
    if dtype != "fp32" and quantize:
        raise ExportError(f"--quantize {quantize} starts from fp32 weights; drop --dtype {dtype}")
    if dtype != "fp32" and backend == "genai":
        raise ExportError(f"the genai backend builds fp32 or int4 CPU graphs; export {dtype} with the default backend")
    if task not in ("generate", "embed"):
        raise ExportError(f"export task {task!r} is not known; use generate or embed")
    if task == "embed" and (backend != "nextoken" or quantize):
        raise ExportError(
            "--task embed is built by nextoken's own builder, in fp32 or fp16: drop --backend and --quantize"
        )
    if kv_dtype is not None and (kv_dtype not in QUANTISED_KV or backend != "nextoken"):
        raise ExportError(
            f"--kv-dtype {kv_dtype}: nextoken's builder keeps the KV cache in int8 or int4 (--kv-dtype int8|int4)"
        )
    if lora_adapters and (backend != "nextoken" or task != "generate"):
        raise ExportError("LoRA inputs are built by nextoken's own builder, for generating packages: drop --backend")
    lora = (
        {"adapters": lora_adapters, "rank": lora_rank, "targets": list(lora_targets or ("q", "k", "v", "o"))}
        if lora_adapters
        else None
    )
    if output.exists() and (not output.is_dir() or (any(output.iterdir()) and not (output / MANIFEST_NAME).exists())):
        raise ExportError(f"output {output} exists and is not an empty directory or a nextoken package; choose another")
    if device == "cuda":
        _require_export_stack(("torch",))
        import torch

        if not torch.cuda.is_available():
            raise ExportError(
                "export on cuda needs a CUDA build of PyTorch and a GPU, and this host has neither "
                "usable; export with --device cpu (the package runs on CUDA all the same)"
            )
    if quantize is not None:
        from .quantize import check_method

        check_method(quantize, block_size)
    if backend == "nextoken":
        from .builder import BuilderUnavailable, build_package

        if check:  # the builder itself needs no torch; the parity check does
            _require_export_stack(("torch", "transformers"))
        offline = not _looks_local(source) and not _hub_reachable()[0]
        try:
            with staged(output) as package:
                report = build_package(
                    source,
                    package,
                    output=output,
                    check=check,
                    atol=atol,
                    dtype=dtype,
                    device=device,
                    offline=offline,
                    untie_head=quantize is not None,
                    task=task,
                    pooling=pooling,
                    normalize=normalize,
                    truncatable=truncatable,
                    lora=lora,
                    say=say,
                )
                if kv_dtype is not None:
                    from .builder import local_folder
                    from .kvquant import quantised_cache

                    folder = local_folder(source, offline)
                    report.manifest = quantised_cache(
                        folder, package, dtype, quantize is not None, say, bits=int(kv_dtype[3:])
                    )
                if quantize:
                    say(f"quantising to {quantize} and measuring it against fp32 ...")
                    report.manifest, report.accuracy = _quantized(package, report.manifest, quantize, block_size)
                    say(f"{quantize} accuracy against fp32: {report.accuracy.line()}")
            report.output = output
            say(report.summary())
            return report
        except BuilderUnavailable as exc:
            if task == "embed" or kv_dtype is not None or lora is not None:
                what = (
                    "an embedding model"
                    if task == "embed"
                    else "with LoRA inputs"
                    if lora is not None
                    else "with an int8 KV cache"
                )
                raise ExportError(f"cannot build {source!r} {what}: {exc}") from None
            say(f"note: nextoken's builder does not cover this model ({exc}); exporting optimum's graph instead")
    _require_export_stack()
    if backend == "genai":
        from .genai import RouteUnavailable, build_with_genai

        try:
            with staged(output) as package:
                report = build_with_genai(
                    source,
                    package,
                    genai_python,
                    precision=quantize or "fp32",
                    check=check,
                    atol=DEFAULT_ATOL if atol is None else atol,
                    say=lambda _m: None if _m.startswith("exported ") else say(_m),
                )
            report.output = output
            say(report.summary())
            return report
        except RouteUnavailable as exc:
            say(f"warning: the genai backend does not apply here ({exc}); exporting the plain optimum graph instead")
    stages = Stages((4 if check else 3) + (1 if quantize else 0), say)
    local = _looks_local(source)
    with _quiet(), staged(output) as package:
        with stages("reading the config"):
            config, offline = _load_config(source, local)
            onnx_config = _onnx_config(config, dtype)
        work = package.parent / "work"
        with stages(f"exporting {config.model_type} to ONNX with optimum ({TASK})"):
            from optimum.exporters.onnx import main_export

            try:
                main_export(
                    source,
                    work,
                    task=TASK,
                    do_validation=False,
                    local_files_only=offline,
                    custom_onnx_configs={"model": onnx_config},
                    dtype=dtype,
                    device=device,
                )
            except ExportError:
                raise
            except Exception as exc:
                first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise ExportError(f"optimum could not export {source!r}: {first}") from None
        with stages("writing the model package"):
            package.mkdir()
            onnx_files = [p for p in work.iterdir() if p.name.startswith("model.onnx")]
            if not any(p.name == "model.onnx" for p in onnx_files):
                raise ExportError(f"optimum wrote no model.onnx for {source!r}")
            for p in onnx_files + [work / n for n in PACKAGE_FILES if (work / n).is_file()]:
                shutil.move(str(p), package / p.name)
            shutil.rmtree(work, ignore_errors=True)
            _keep_last_logits(package / "model.onnx")
            manifest = _manifest_from_graph(package / "model.onnx", config, package, source)
            manifest.save(package)
        manifest, diff, tolerance, n = checked_parity(
            source,
            package,
            manifest,
            stages,
            check=check,
            atol=atol,
            dtype=dtype,
            device=device,
            offline=offline,
            output=output,
        )
        accuracy = None
        if quantize:
            with stages(f"quantising to {quantize} and measuring it against fp32"):
                manifest, accuracy = _quantized(package, manifest, quantize, block_size)
            say(f"{quantize} accuracy against fp32: {accuracy.line()}")
    report = ExportReport(output, manifest, diff, tolerance, n, stages.seconds, accuracy)
    say(report.summary())
    return report
