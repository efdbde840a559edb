"""``python -m clusterhub``: its help is plain text, and a wrong command is a
usage error (exit code 2), as a user sees them in a terminal."""

import subprocess
import sys

import pytest

COMMANDS = ("bench", "demo")


def run(*args):
    return subprocess.run(
        [sys.executable, "-m", "clusterhub", *args],
        capture_output=True, text=True, timeout=30,
    )


def assert_plain(text):
    """No reStructuredText or Markdown markup leaks into what the user reads."""
    for markup in ("``", ":func:", ":class:", ":meth:", "`"):
        assert markup not in text, (markup, text)


def test_help_is_plain_and_lists_the_commands():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert out.startswith("usage: python -m clusterhub ")
    assert_plain(out)
    assert "messages and crash-robust global locks" in out
    listed = {line.split()[0] for line in out.splitlines() if line.startswith("    ")}
    assert set(COMMANDS) <= listed, out
    assert "a short tour" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_command_help_is_plain(command):
    proc = run(command, "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    out = proc.stdout
    assert out.startswith(f"usage: python -m clusterhub {command} ")
    assert_plain(out)
    # a description of its own, not only the usage line and the options
    description = out.split("\n\n")[1]
    assert not description.startswith(("options:", "optional arguments:")), out
    assert len(description.split()) > 10, out


def test_bench_help_lists_its_options():
    out = run("bench", "--help").stdout
    assert "--json" in out and "--only" in out, out


@pytest.mark.parametrize("args", [("nope",), ("--nope",), ()], ids=["unknown", "option", "none"])
def test_bad_command_is_a_usage_error(args):
    proc = run(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stdout == ""
    assert proc.stderr.startswith("usage: python -m clusterhub "), proc.stderr
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
    if args == ("nope",):
        assert "'nope'" in proc.stderr and "bench" in proc.stderr and "demo" in proc.stderr
