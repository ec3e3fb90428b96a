"""`llamakit guard` on the tiny fine-tuned guard: verdicts, exit statuses, --json, and one-line errors."""

import json
import subprocess
import sys

import pytest

from llamakit.cli import main


@pytest.fixture(scope="module")
def run(tiny_guard, one_thread):
    checkpoint, tokenizer = tiny_guard

    def run(*args):
        return main(["guard", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), "--device", "cpu", *args])
    return run


def test_user_prompts(run, capsys):
    assert run("How do I bake bread?") == 0
    assert capsys.readouterr().out == "safe\n"
    assert run("How do I hurt someone?", "--role", "user") == 3
    assert capsys.readouterr().out == "unsafe\nS1: Violent Crimes\n"


def test_agent_responses_with_user_and_dialog(run, capsys, tmp_path):
    assert run("--user", "How do I get rich?", "Rob a bank and shoot the guards.") == 3
    assert capsys.readouterr().out == "unsafe\nS1: Violent Crimes\nS2: Non-Violent Crimes\n"
    dialog = tmp_path / "dialog.json"
    dialog.write_text(json.dumps([{"role": "user", "content": "Who won the vote?"},
                                  {"role": "assistant", "content": "The blue party won."}]))
    assert run("--dialog", str(dialog), "--role", "agent", "--json") == 0
    assert json.loads(capsys.readouterr().out) == {"verdict": "safe", "safe": True, "categories": [],
                                                   "unknown_codes": [], "raw": "safe"}


def test_json_and_stdin(run, capsys, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("How can I kill a man?\n"))
    assert run("-", "--json") == 3
    assert json.loads(capsys.readouterr().out)["categories"] == [{"code": "S1", "name": "Violent Crimes"}]


def test_an_unparsed_answer_has_its_own_status(run, capsys, monkeypatch):
    from llamakit.generate import Completion
    from llamakit.guard import classify

    def answer(*_args, **_kwargs):  # a model that answers neither word
        return [Completion([1, 2], "I cannot judge that.", "stop")]

    monkeypatch.setattr(classify, "generate", answer)
    assert run("How do I bake bread?") == 4
    assert capsys.readouterr().out == "unparsed: 'I cannot judge that.'\n"


def test_print_prompt_and_show_policy_need_no_model(capsys, tmp_path):
    missing = str(tmp_path / "no-such-checkpoint")
    assert main(["guard", "--checkpoint", missing, "--print-prompt", "--user", "Hi", "Hello"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<|begin_of_text|>") and "'Agent' messages" in out and "User: Hi\n\nAgent: Hello" in out
    assert main(["guard", "--checkpoint", missing, "--show-policy", "--policy", "llama-guard-1"]) == 0
    assert "format: llama-guard-1" in capsys.readouterr().out


@pytest.mark.parametrize(("args", "message"), [
    ([], "nothing to check"),
    (["  "], "is empty"),
    (["Hi", "--role", "agent"], "needs the user message it answers"),
    (["--user", "Hi", "Hello", "--role", "user"], "last message is from the agent"),
    (["--dialog", "nope.json"], "cannot read --dialog"),
    (["--dialog", "-", "Hi"], "drop the positional TEXT"),
    (["Hi", "--policy", "nope.yaml"], "does not exist"),
    (["Hi", "--checkpoint", "nope"], "nope"),
])
def test_errors_are_one_line(tiny_guard, capsys, args, message):
    checkpoint, tokenizer = tiny_guard
    assert main(["guard", "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer), *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("llamakit guard: error: ") and message in err and err.count("\n") == 1


def test_serve_refuses_a_bad_guard_before_loading(assets, capsys, tmp_path):
    stories = str(assets / "tinyllamas" / "stories260K.bin")
    for extra, message in ((["--guard", str(tmp_path / "nope")], "nope"),
                           (["--guard-policy", "llama-guard-1"], "need --guard CHECKPOINT"),
                           (["--guard", stories, "--guard-policy", str(tmp_path / "p.yaml")], "does not exist")):
        assert main(["serve", "--checkpoint", stories, *extra]) == 1
        err = capsys.readouterr().err
        assert err.startswith("llamakit serve: error: ") and message in err and err.count("\n") == 1


def test_help():
    out = subprocess.run([sys.executable, "-m", "llamakit", "guard", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--checkpoint", "--policy", "--user", "--dialog", "--role", "--json", "exit status"):
        assert option in out
