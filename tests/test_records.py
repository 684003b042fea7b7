"""Request records and replay: a record replays to the same tokens (greedy and seeded, through the
server too); on another package, or with another plugin version, the replay names the first
divergent step and what differs."""

from __future__ import annotations

import json

import pytest

from helpers import run_cli, serving
from nextoken import InvalidRequestError
from nextoken.tools.replay import replay

PROMPT = list(range(5, 30))


@pytest.fixture(scope="module")
def other_package(tiny_model):
    """Another tiny model with the same byte vocabulary: the same record gives other tokens on it."""
    return tiny_model("qwen2")[1]


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.9, seed=6, top_k=30)])
def test_a_record_replays_to_the_same_tokens(llama_engine, kw):
    got = llama_engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True, record=True, **kw)
    record = got.record
    assert record["prompt_token_ids"] == PROMPT and record["token_ids"] == got.token_ids
    assert record["engine"]["provider"] == "CPUExecutionProvider" and record["package"]["checksums"]
    assert any(p[1] == ("sample" if kw else "greedy") for p in record["plugins"])
    report = replay(json.loads(json.dumps(record)), engine=llama_engine)
    assert report.identical and report.steps == 16 and report.differences == []


def test_a_replay_names_the_divergence_and_what_differs(llama_engine, other_package):
    record = llama_engine.generate(PROMPT, max_new_tokens=16, ignore_eos=True, record=True).record
    report = replay(record, package=other_package)
    assert not report.identical and report.step is not None
    assert report.recorded_token == record["token_ids"][report.step] and report.replayed_token != report.recorded_token
    assert report.replayed_logprob is not None
    assert any(d.startswith("the package's files (") for d in report.differences)
    record["plugins"] = [[kind, name, plugin, dist, "0.0.1"] for kind, name, plugin, dist, _ in record["plugins"]]
    changed = replay(record, engine=llama_engine)
    assert changed.identical and any("recorded nextoken.plugins.sampling 0.0.1" in d for d in changed.differences)
    with pytest.raises(InvalidRequestError, match="not a nextoken record"):
        replay({"hello": 1}, engine=llama_engine)


def test_cli_record_and_replay(tiny_llama, other_package, tmp_path):
    record = tmp_path / "r.json"
    got = run_cli(
        "generate",
        str(tiny_llama[1]),
        "Hello",
        "--max-new-tokens",
        "8",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--record",
        str(record),
    )
    assert got.returncode == 0 and "record written" in got.stderr and json.loads(record.read_text())["token_ids"]
    assert got.stdout.strip(), "generate --record printed no text"
    same = run_cli("replay", str(record))
    assert same.returncode == 0 and same.stdout.startswith("identical: 8 tokens"), same.stdout + same.stderr
    other = run_cli("replay", str(record), "--package", str(other_package))
    assert other.returncode == 3 and "diverges at step" in other.stdout and "the package's files" in other.stdout


def test_the_server_keeps_records_when_asked(tiny_llama, tmp_path):
    with serving(tiny_llama[1], "tiny", record_dir=tmp_path / "records") as (client, engine, *_):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=6, temperature=0.7, seed=1)
        stream = client.completions.create(model="tiny", prompt="Hi", max_tokens=4, stream=True, seed=2)
        list(stream)
        records = sorted((tmp_path / "records").glob("*.json"))
        assert len(records) == 2
        assert all(replay(p, engine=engine).identical for p in records)
        client.completions.create(model="tiny", prompt="Hey", max_tokens=4, temperature=1.0)  # no seed
        unseeded = [p for p in (tmp_path / "records").glob("*.json") if p not in records]
        assert "sampled without a seed" in replay(unseeded[0], engine=engine).line()


def test_replay_reads_every_record_nextoken_writes_and_names_what_is_wrong_with_others(tiny_llama, tmp_path):
    record = tmp_path / "n3.json"
    got = run_cli(
        "generate",
        str(tiny_llama[1]),
        "Hello",
        "--max-new-tokens",
        "6",
        "--temperature",
        "0.8",
        "--seed",
        "3",
        "--n",
        "3",
        "--record",
        str(record),
    )
    assert got.returncode == 0 and len(json.loads(record.read_text())) == 3
    same = run_cli("replay", str(record))
    assert same.returncode == 0 and same.stdout.splitlines() == [f"[choice {i}] identical: 6 tokens" for i in range(3)]
    whole = json.loads(record.read_text())[0]
    for name, text in [
        ("list.json", "[]"),
        ("other.json", '{"a": 1}'),
        ("cut.json", '{"nextoken_record": 1'),
        ("keyless.json", json.dumps({k: v for k, v in whole.items() if k != "token_ids"})),
    ]:
        (tmp_path / name).write_text(text)
        bad = run_cli("replay", str(tmp_path / name))
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and lines[0].startswith("nextoken: error:"), bad.stderr
        assert "Traceback" not in bad.stderr
