"""Where each node of a package's graph runs: the execution provider onnxruntime assigned it (its
graph assignment record), the time each took in one prefill and one decode step (its profiler),
and the fallbacks: compute nodes a CUDA session left on the CPU, and the casts onnxruntime inserts
around ops a provider has no kernel for in the graph's precision (an fp16 MatMul on an x86 CPU
runs in fp32 between two casts).

    nextoken info PKG --placement [--device cuda] [--json]
"""

from __future__ import annotations

import collections
import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from ..device import heavy_on_cpu, resolve_device, session_options
from ..kvbackends import for_request
from ..manifest import Manifest
from ..runner import StepRunner

__all__ = ["PlacementReport", "placement"]

_INSERTED_CAST = "InsertedPrecisionFreeCast_"


@dataclass
class PlacementReport:
    """``providers``: nodes and time per provider; ``nodes``: every node with its provider and
    time (microseconds over the profiled steps); ``fallbacks``: what ran elsewhere than it should,
    and why; ``cast_ops``: op types that inserted casts wrap, and how many casts each."""

    package: str
    device: str
    providers: dict[str, dict[str, float]]
    nodes: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    cast_ops: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """Lines for people: per provider, then the fallbacks by kind."""
        lines = [f"{self.package} on {self.device}"]
        for provider, row in self.providers.items():
            lines.append(f"  {provider:24} {int(row['nodes']):5} nodes  {100 * row['time_share']:5.1f}% of the time")
        by_kind = collections.Counter(f["kind"] for f in self.fallbacks)
        if not by_kind:
            lines.append("  no fallbacks")
        if by_kind.get("cpu_on_cuda"):
            ops = collections.Counter(f["op_type"] for f in self.fallbacks if f["kind"] == "cpu_on_cuda")
            lines.append(
                f"  {by_kind['cpu_on_cuda']} compute nodes on the CPU in a CUDA session: "
                + ", ".join(f"{op} x{n}" for op, n in ops.most_common())
            )
        if by_kind.get("inserted_cast"):
            lines.append(
                f"  {by_kind['inserted_cast']} casts inserted around ops without a kernel in this precision: "
                + ", ".join(f"{op} ({n} casts)" for op, n in sorted(self.cast_ops.items(), key=lambda x: -x[1]))
            )
        return "\n".join(lines)


def placement(package: str | Path, device: str = "auto", threads: int | None = None) -> PlacementReport:
    """Load ``package`` on ``device`` with its graph assignment recorded and the profiler on, run
    one prefill and one decode step, and report where each node ran (see the module's doc)."""
    package = Path(package)
    manifest = Manifest.load(package)
    choice = resolve_device(device)
    options = session_options(threads)
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "nextoken-placement")
        session = ort.InferenceSession(str(package / manifest.model_file), options, providers=list(choice.providers))
        assigned = {
            n.name: (sub.ep_name, n.op_type)
            for sub in session.get_provider_graph_assignment_info()
            for n in sub.get_nodes()
        }
        runner = StepRunner(session, manifest, choice.device)
        kv = for_request(runner, 1, min(64, manifest.context_length), manifest.pad_token_id or 0)
        kv.join(kv.prefill([[manifest.bos_token_id or 1] * 8]))
        kv.decode(np.array([manifest.bos_token_id or 1]))
        events = json.loads(Path(session.end_profiling()).read_text())
    times: dict[str, float] = collections.defaultdict(float)
    ran: dict[str, tuple[str, str]] = {}
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            name = e["name"][: -len("_kernel_time")]
            times[name] += e.get("dur", 0)
            ran[name] = (e["args"].get("provider", "?"), e["args"].get("op_name", "?"))
    nodes = {**{n: (ep, op) for n, (ep, op) in assigned.items()}, **ran}
    total = sum(times.values()) or 1
    providers: dict[str, dict[str, float]] = {}
    for name, (ep, _) in nodes.items():
        row = providers.setdefault(ep, {"nodes": 0, "time_us": 0.0, "time_share": 0.0})
        row["nodes"] += 1
        row["time_us"] += times.get(name, 0)
    for row in providers.values():
        row["time_share"] = row["time_us"] / total
    report = PlacementReport(
        str(package),
        choice.device,
        providers,
        [
            {"name": n, "provider": ep, "op_type": op, "time_us": times.get(n, 0)}
            for n, (ep, op) in sorted(nodes.items())
        ],
    )
    if choice.device == "cuda":
        report.fallbacks += [
            {"kind": "cpu_on_cuda", "node": n, "op_type": op, "detail": "a compute node the CUDA provider did not take"}
            for n, op in sorted(heavy_on_cpu(session))
        ]
    casts = sorted(n for n in nodes if n.startswith(_INSERTED_CAST))
    if casts:
        report.cast_ops = _cast_ops(package / manifest.model_file, [n[len(_INSERTED_CAST) :] for n in casts])
        report.fallbacks += [
            {
                "kind": "inserted_cast",
                "node": n,
                "op_type": "Cast",
                "detail": f"tensor {n[len(_INSERTED_CAST) :]} is cast for an op without a kernel in "
                f"{manifest.kv_dtype} on {choice.provider}",
            }
            for n in casts
        ]
    return report


def _cast_ops(model_file: Path, tensors: list[str]) -> dict[str, int]:
    """The op types inserted casts wrap: for each cast tensor, the op that makes it and the ops that
    read it; the op types found at most casts are those without a kernel (an fp16 MatMul on an x86
    CPU: a cast on each input, one on its output)."""
    import onnx

    graph = onnx.load(str(model_file), load_external_data=False).graph
    producer = {out: node.op_type for node in graph.node for out in node.output}
    consumers: dict[str, list[str]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            consumers[name].append(node.op_type)
    votes: collections.Counter[str] = collections.Counter()
    for tensor in tensors:
        for op in {producer.get(tensor), *consumers.get(tensor, [])}:
            if op is not None:
                votes[op] += 1
    top = max(votes.values(), default=0)
    return {op: n for op, n in votes.items() if n * 2 >= top}
