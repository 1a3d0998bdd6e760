"""The `edgellm` command line through click's CliRunner: help, list, info, errors (no model needed)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from edgellm.cli.group import LazyCommand, LazyGroup
from edgellm.cli.main import COMMANDS, cli


@pytest.fixture
def runner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    """A runner whose edgellm cache is an empty temporary folder."""
    monkeypatch.setenv("EDGELLM_HOME", str(tmp_path / "home"))
    return CliRunner()


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception,
                                                                                        SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_group_help_lists_commands_and_completion(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["--help"])
    assert result.exit_code == 0
    for name in ("chat", "generate", "pull", "list", "rm", "info"):
        assert f"  {name} " in result.output
    assert "_EDGELLM_COMPLETE=bash_source edgellm" in result.output


def test_version(runner: CliRunner) -> None:
    from edgellm import __version__

    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"edgellm {__version__}"


@pytest.mark.parametrize("name", [n for n in COMMANDS])
def test_every_command_has_help(runner: CliRunner, name: str) -> None:
    # serve and bench load lazily and drop out if their import breaks: in this build that is a bug
    assert cli.get_command(click.Context(cli), name) is not None, f"{name} failed to load"
    for flag in ("--help", "-h"):
        result = runner.invoke(cli, [name, flag])
        assert result.exit_code == 0, result.output
        assert result.output.startswith(f"Usage: edgellm {name}")


def test_engine_options_are_shared(runner: CliRunner) -> None:
    for name in ("generate", "chat"):
        out = runner.invoke(cli, [name, "--help"]).output
        for opt in ("--device", "--dtype", "--threads", "--max-model-len", "--kv-cache-memory"):
            assert opt in out, (name, opt)


def run_python(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python ARGS`` in a fresh process, output captured, failures returned rather than raised."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args", [["--help"], ["list"], ["generate", "--help"], ["chat", "--help"],
                                  ["pull", "no-such-model-xyz"], ["rm", "no-such-model-xyz"]])
def test_light_commands_do_not_import_torch(tmp_path: Path, args: list[str]) -> None:
    code = ("import sys\nfrom edgellm.cli.main import cli\n"
            f"try:\n    cli({args!r}, standalone_mode=False)\nexcept Exception:\n    pass\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numba') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    done = run_python(["-c", code], {"EDGELLM_HOME": str(tmp_path)})
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr


def test_list_on_an_empty_cache_shows_the_catalog(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    assert "No models in the cache" in result.output
    assert "smollm2-135m-instruct" in result.output and "93.8 MiB" in result.output


def test_list_shows_cached_models(runner: CliRunner, tmp_path: Path) -> None:
    from edgellm.catalog import models_dir

    folder = models_dir() / "hf--org--tiny"
    folder.mkdir(parents=True)
    (folder / "model.gguf").write_bytes(b"GGUF" + b"\0" * 2044)
    (folder / "edgellm-manifest.json").write_text(json.dumps(
        {"name": "org/tiny", "source": "hf:org/tiny", "file": "model.gguf"}))
    result = runner.invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    header, row = result.output.splitlines()[:2]
    assert header.split() == ["NAME", "SIZE", "PATH"]
    assert row.split()[0] == "org/tiny" and row.endswith("model.gguf")
    data = json.loads(runner.invoke(cli, ["list", "--json"]).output)
    assert [m["name"] for m in data["cached"]] == ["org/tiny"]
    assert "smollm2-135m-instruct" in [m["name"] for m in data["available"]]


def test_rm_removes_and_fails_for_missing(runner: CliRunner) -> None:
    from edgellm.catalog import models_dir

    folder = models_dir() / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "x").write_text("x")
    result = runner.invoke(cli, ["rm", "smollm2"])
    assert result.exit_code == 0 and "removed smollm2" in result.output and not folder.exists()
    assert_one_line_error(runner.invoke(cli, ["rm", "smollm2"]), "not in the cache")


def test_info_json(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["info", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert set(info["cpu"]["isa"]) >= {"avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx"}
    assert info["cpu"]["threads"] >= 1
    assert info["memory"]["total"] >= info["memory"]["available"] > 0
    assert "cpu" in info["devices"] and info["torch"]
    assert {"available", "devices"} <= set(info["cuda"]) and "available" in info["rocm"] and "available" in info["xpu"]
    assert {"ipex", "numba", "triton"} <= set(info["libraries"])
    assert info["cache_dir"].endswith("home")


def test_info_text(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["info"])
    assert result.exit_code == 0
    for label in ("CPU", "ISA", "threads", "torch", "CUDA", "ROCm", "XPU", "numba", "memory", "cache"):
        assert any(line.startswith(label) for line in result.output.splitlines()), label


@pytest.mark.parametrize("args", [
    ["generate", "-m", "no-such-model", "hello"],
    ["chat", "no-such-model"],
    ["pull", "no-such-model"],
    ["rm", "no-such-model"],
])
def test_unknown_model_is_one_line(runner: CliRunner, args: list[str]) -> None:
    assert_one_line_error(runner.invoke(cli, args, input="hi\n"), "no-such-model", "Catalog models")


def test_corrupt_model_files_are_one_line(runner: CliRunner, tmp_path: Path) -> None:
    not_gguf = tmp_path / "garbage.gguf"
    not_gguf.write_bytes(os.urandom(4096))
    assert_one_line_error(runner.invoke(cli, ["generate", "-m", str(not_gguf), "hi"]), "not a GGUF file")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + os.urandom(64))
    assert_one_line_error(runner.invoke(cli, ["generate", "-m", str(truncated), "hi"]), "truncated.gguf")


@pytest.mark.parametrize(("args", "needle"), [
    (["generate", "--kv-cache-memory", "lots", "x"], "--kv-cache-memory"),
    (["generate", "--kv-cache-memory", "1.5", "x"], "fraction"),
    (["serve", "--kv-cache-memory", "1.5"], "fraction"),
    (["generate", "--temperature", "-1", "x"], "--temperature"),
    (["generate", "--device", "tpu", "x"], "--device"),
    (["chat", "--threads", "0"], "--threads"),
    (["chat", "--url", "http://x", "--threads", "2"], "engine options"),
    (["generate", "--raw", "--system", "s", "x"], "--system needs --chat"),
])
def test_bad_options_exit_2_without_traceback(runner: CliRunner, args: list[str], needle: str) -> None:
    result = runner.invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and needle in result.stderr


def test_empty_prompt_from_stdin(runner: CliRunner) -> None:
    result = runner.invoke(cli, ["generate", "-"], input="  \n")
    assert result.exit_code == 2 and "prompt is empty" in result.stderr


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    env = {"EDGELLM_HOME": str(tmp_path)}
    done = run_python(["-m", "edgellm.cli.main", "-v", "rm", "no-such-model"], env)
    assert done.returncode != 0 and "Traceback" in done.stderr and "ModelNotFoundError" in done.stderr
    quiet = run_python(["-m", "edgellm.cli.main", "rm", "no-such-model"], env)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr and quiet.stderr.count("\n") == 1


def make_group(**commands: LazyCommand) -> click.Group:
    @click.group(cls=LazyGroup, lazy=commands)
    def group() -> None:
        pass

    return group


def test_absent_optional_command_is_not_offered() -> None:
    group = make_group(info=COMMANDS["info"], ghost=LazyCommand("edgellm.cli.no_such_module:cmd", "boo",
                                                                optional=True))
    runner = CliRunner()
    assert "ghost" not in runner.invoke(group, ["--help"]).output
    assert runner.invoke(group, ["ghost"]).exit_code == 2


def test_unexpected_errors_name_their_type_in_one_line() -> None:
    @click.group(cls=LazyGroup, lazy={})
    def group() -> None:
        pass

    @group.command()
    def boom() -> None:
        raise KeyError("missing piece")

    result = CliRunner().invoke(group, ["boom"])
    assert_one_line_error(result, "KeyError: 'missing piece'", "-v")


def test_shell_completion_offers_commands_and_models() -> None:
    env = {"_EDGELLM_COMPLETE": "bash_complete", "COMP_WORDS": "edgellm ch", "COMP_CWORD": "1"}
    done = run_python(["-m", "edgellm.cli.main"], env)
    assert "plain,chat" in done.stdout
    env.update(COMP_WORDS="edgellm chat smol", COMP_CWORD="2")
    done = run_python(["-m", "edgellm.cli.main"], env)
    assert "plain,smollm2-135m-instruct" in done.stdout and "plain,smollm2" in done.stdout


def test_serve_hands_the_batching_limits_to_the_engine(runner: CliRunner, monkeypatch) -> None:
    import edgellm.async_llm

    seen = {}

    def fake_engine(model, **options):
        seen.update(options, model=model)
        raise RuntimeError("stop here")

    monkeypatch.setattr(edgellm.async_llm, "AsyncLLM", fake_engine)
    result = runner.invoke(cli, ["serve", "--max-num-seqs", "8", "--max-num-batched-tokens", "1024"])
    assert result.exit_code == 1 and "stop here" in result.stderr
    assert seen["max_num_seqs"] == 8 and seen["max_num_batched_tokens"] == 1024
    assert seen["kv_page_in"] == "idle"  # a server pages its KV pool in while it waits
    runner.invoke(cli, ["serve", "--kv-page-in", "lazy"])
    assert seen["kv_page_in"] == "lazy"
    assert runner.invoke(cli, ["serve", "--max-num-batched-tokens", "0"]).exit_code == 2
    assert runner.invoke(cli, ["serve", "--kv-page-in", "eager"]).exit_code == 2
