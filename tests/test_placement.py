"""The placement report: which provider runs each node, the time share, and the fallbacks; on the
CPU an fp16 package's inserted casts (ops without an fp16 kernel on this provider) are reported."""

from __future__ import annotations

import json
import platform

import pytest

from helpers import run_cli
from nextoken.device import heavy_on_cpu
from nextoken.tools.placement import placement


@pytest.fixture(scope="module")
def fp16_package(tmp_path_factory, stories_dir):
    from nextoken.exporters import export

    out = tmp_path_factory.mktemp("fp16") / "pkg"
    export(stories_dir, out, dtype="fp16", check=False, progress=None)
    return out


def test_an_fp32_package_on_the_cpu_has_no_fallbacks(stories_package):
    report = placement(stories_package, "cpu")
    assert list(report.providers) == ["CPUExecutionProvider"] and report.fallbacks == []
    assert report.providers["CPUExecutionProvider"]["time_share"] == pytest.approx(1.0)
    ops = {n["op_type"] for n in report.nodes}
    assert {"GroupQueryAttention", "MatMul"} <= ops and sum(n["time_us"] for n in report.nodes) > 0


@pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="x86 CPUs have no fp16 MatMul kernel in onnxruntime; others may",
)
def test_an_fp16_package_on_the_cpu_reports_its_inserted_casts(fp16_package):
    report = placement(fp16_package, "cpu")
    casts = [f for f in report.fallbacks if f["kind"] == "inserted_cast"]
    assert casts and all(f["node"].startswith("InsertedPrecisionFreeCast_") for f in casts)
    assert "MatMul" in report.cast_ops  # the op without an fp16 kernel here
    assert "casts inserted around ops without a kernel in this precision: MatMul" in report.summary()


def test_cli_placement(stories_package):
    out = run_cli("info", str(stories_package), "--placement", "--device", "cpu", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["device"] == "cpu" and data["nodes"] and data["fallbacks"] == []
    text = run_cli("info", str(stories_package), "--placement", "--device", "cpu")
    assert "CPUExecutionProvider" in text.stdout and "no fallbacks" in text.stdout


def test_a_session_without_the_record_says_nothing(stories_engine):
    assert heavy_on_cpu(stories_engine.session) == []  # a CPU engine does not record (and is on the CPU)


def test_a_recording_session_lists_the_compute_nodes_on_the_cpu(stories_package):
    """What a CUDA engine warns of and ``--placement --device cuda`` reports: compute nodes the CPU
    provider holds. A CPU session that records its assignment holds them all."""
    import onnxruntime as ort

    from nextoken.device import COMPUTE_OPS
    from nextoken.manifest import Manifest

    options = ort.SessionOptions()
    options.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    session = ort.InferenceSession(
        str(stories_package / Manifest.load(stories_package).model_file), options, providers=["CPUExecutionProvider"]
    )
    heavy = heavy_on_cpu(session)
    assert heavy and {op for _, op in heavy} <= COMPUTE_OPS and "MatMul" in {op for _, op in heavy}
    every = [n for sub in session.get_provider_graph_assignment_info() for n in sub.get_nodes()]
    assert len(heavy) == sum(n.op_type in COMPUTE_OPS for n in every)
