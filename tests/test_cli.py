"""The command line on the built-in default model: generate, chat, bench, help and every bad input.

Every bad input and Ctrl-C must give one line on stderr and a non-zero status (2 for usage errors,
130 for Ctrl-C), never a traceback.
"""

from __future__ import annotations

import builtins
import re
import subprocess
import sys

import pytest

import fastdecode
from fastdecode import cli


def test_generate_greedy_is_deterministic(capsys):
    argv = ["generate", "--prompt", "Return the", "--max-new-tokens", "8", "--greedy",
            "--no-stream"]
    assert cli.main(argv) == 0
    first = capsys.readouterr().out
    assert cli.main(argv) == 0
    assert capsys.readouterr().out == first and first.strip()


def test_generate_streams_the_prompt_then_the_completion(capsys):
    assert cli.main(["generate", "--prompt", "Return the", "--max-new-tokens", "6",
                     "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("Return the")


def test_chat_answers_then_quits(monkeypatch, capsys):
    lines = iter(["Explain the module", "", "exit"])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(lines))
    assert cli.main(["chat", "--max-new-tokens", "4", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "quit" in out.splitlines()[0] and len(out.splitlines()) >= 2


def test_chat_leaves_on_ctrl_c(monkeypatch):
    def interrupt(prompt=""):
        raise KeyboardInterrupt
    monkeypatch.setattr(builtins, "input", interrupt)
    assert cli.main(["chat"]) == 0


def test_bench_reports_both_paths(capsys, monkeypatch):
    calls = []
    real = fastdecode.generate
    monkeypatch.setattr(fastdecode, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert cli.main(["bench", "--max-new-tokens", "4", "--prompt-len", "8", "--greedy",
                     "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "model.generate" in out and "fastdecode.generate" in out and "speed-up" in out
    assert "median of 2" in out and len(calls) == 3  # a warm-up, then one call per pair


def _one_line_error(capsys, argv, status=2) -> str:
    assert cli.main(argv) == status
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastdecode: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


BAD = [
    (["generate", "--model", "/nonexistent/checkpoint"], "no such directory"),
    (["generate", "--prompt", ""], "--prompt must not be empty"),
    (["generate", "--prompt", "   "], "--prompt must not be empty"),
    (["generate", "--top-k", "-5"], "--top-k must be >= 0"),
    (["generate", "--temperature", "nan"], "--temperature must be a finite number > 0"),
    (["generate", "--temperature", "inf"], "--temperature must be a finite number > 0"),
    (["generate", "--temperature", "0"], "--temperature must be a finite number > 0"),
    (["generate", "--repetition-penalty", "nan"], "--repetition-penalty must be > 0"),
    (["generate", "--repetition-penalty", "inf"], "--repetition-penalty must be > 0"),
    (["generate", "--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["generate", "--seed", str(2**70)], r"--seed must be an integer in \[0, 2\*\*63\)"),
    (["generate", "--seed", "2**70"], "invalid int value"),
    (["generate", "--seed", "-1"], r"--seed must be an integer in \[0, 2\*\*63\)"),
    (["generate", "--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["generate", "--top-p", "nan"], r"--top-p must be in \(0, 1\]"),
    (["generate", "--min-p", "-0.1"], r"--min-p must be in \[0, 1\]"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1"),
    (["bench", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["bench", "--prompt-len", "0"], "--prompt-len must be >= 1"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1"),
    (["generate", "--max-new-tokens", "abc"], "invalid int value"),
    (["frobnicate"], "invalid choice"),
    ([], "required"),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a) or "none" for a, _ in BAD])
def test_bad_input_is_one_line_and_status_2(capsys, argv, message):
    line = _one_line_error(capsys, argv)
    assert re.search(message, line), line


def test_folder_that_is_not_a_checkpoint(capsys, tmp_path):
    assert "not a transformers checkpoint" in _one_line_error(
        capsys, ["generate", "--model", str(tmp_path)])
    (tmp_path / "config.json").write_text("{\"model_type\": \"llama\"}")  # config, no weights
    assert "cannot load the checkpoint" in _one_line_error(
        capsys, ["generate", "--model", str(tmp_path)])


def test_prompt_longer_than_the_context_is_refused_or_truncated(capsys):
    from fastdecode.hf.frontend import context_length, load

    context = context_length(load(None, "cpu", __import__("torch").float32)[0])
    argv = ["generate", "--prompt", "Return the value of the module", "--greedy", "--no-stream",
            "--max-new-tokens", str(context - 3)]
    assert "exceeds the model's context" in _one_line_error(capsys, argv)
    assert cli.main(argv + ["--truncate-prompt"]) == 0
    captured = capsys.readouterr()
    assert "prompt truncated to its last 3" in captured.err and captured.out.strip()


def test_ctrl_c_during_generate_is_status_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(fastdecode, "generate", interrupted)
    assert "interrupted" in _one_line_error(capsys, ["generate", "--max-new-tokens", "2"],
                                            status=130)


def test_help_shows_defaults_and_explains_sampling(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "``" not in text
    description, options = text.split("options:")
    for option in ("--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                   "--repetition-penalty", "--seed", "--prompt", "--device", "--dtype",
                   "--model", "--truncate-prompt", "--greedy", "--no-stream"):
        block = options[options.index(f"  {option}"):].split("\n  -")[0]
        assert "default" in block, option
    for term in ("repetition penalty", "temperature", "top-k", "top-p", "min-p"):
        assert f"  {term} " in description, term  # a sentence each


def test_command_line_does_not_import_transformers():
    code = ("import sys; import fastdecode.cli; "
            "sys.exit(1 if 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
