"""The command line on the built-in default model: generate, chat, bench and argument errors."""

from __future__ import annotations

import builtins

import pytest

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


def test_bench_reports_both_paths(capsys):
    assert cli.main(["bench", "--max-new-tokens", "4", "--prompt-len", "8", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert "model.generate" in out and "fastdecode.generate" in out and "speed-up" in out


@pytest.mark.parametrize("argv, message", [
    (["--temperature", "0"], "--temperature must be > 0"),
    (["--top-p", "1.5"], r"--top-p must be in \(0, 1\]"),
    (["--min-p", "-0.1"], r"--min-p must be in \[0, 1\]"),
    (["--repetition-penalty", "0"], "--repetition-penalty must be > 0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
])
def test_bad_options_name_the_option(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["generate", *argv])


def test_missing_model_directory_is_a_clear_error(tmp_path):
    with pytest.raises(OSError):
        cli.main(["generate", "--model", str(tmp_path / "nope"), "--max-new-tokens", "2"])
