"""``edgellm bench`` runs end to end and reports its measures (no timing is asserted)."""
import json

import pytest
from click.testing import CliRunner

from edgellm.cli.main import cli

pytestmark = pytest.mark.slow


def test_bench_latency_json(smollm2_gguf):
    r = CliRunner().invoke(cli, ["bench", "latency", str(smollm2_gguf), "-p", "32", "-n", "4", "-r", "1",
                                 "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output[r.output.index("{"):])
    assert out["prompt_tokens"] == 32 and out["output_tokens"] == 4
    assert out["prefill_tok_s"] > 0 and out["decode_tok_s"] > 0


def test_bench_throughput_from_loadgen_prompts(smollm2_gguf, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."}]})
                                 for i in range(3)))
    for extra in ([], ["--kv-cache-dtype", "int8"]):
        r = CliRunner().invoke(cli, ["bench", "throughput", str(smollm2_gguf), "--prompts", str(prompts),
                                     "--num-prompts", "3", "-n", "4", "--json", *extra])
        assert r.exit_code == 0, r.output
        out = json.loads(r.output[r.output.index("{"):])
        assert out["requests"] == 3 and out["output_tokens"] == 12


def test_bench_temperature_samples_every_token(smollm2_gguf, monkeypatch):
    """``--temperature`` reaches every request: decode then measures the sampled path (full logits)."""
    import edgellm.benchmark as benchmark

    seen = []
    params = benchmark.SamplingParams
    monkeypatch.setattr(benchmark, "SamplingParams", lambda **kw: seen.append(kw["temperature"]) or params(**kw))
    r = CliRunner().invoke(cli, ["bench", "latency", str(smollm2_gguf), "-p", "16", "-n", "4", "-r", "1",
                                 "--temperature", "0.7", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output[r.output.index("{"):])["temperature"] == 0.7 and seen == [0.7]
    r = CliRunner().invoke(cli, ["bench", "throughput", str(smollm2_gguf), "--num-prompts", "2", "-n", "3",
                                 "--temperature", "1.0"])
    assert r.exit_code == 0, r.output
    assert "temperature 1" in r.output and seen == [0.7, 1.0]
    r = CliRunner().invoke(cli, ["bench", "latency", "--engine", "hf", "--temperature", "0.7"])
    assert r.exit_code != 0 and "greedy" in r.output
