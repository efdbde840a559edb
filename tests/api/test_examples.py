"""The examples run as a user would run them and print what they promise."""

import re
import subprocess
import sys

import pytest

from conftest import ROOT

EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"

EXPECTED = {
    "index": [
        "master: got 'hello, me' from itself",
        "master: got 'hello, master' from worker 1",
        "worker 1: got 'hello, worker' from the master",
    ],
    "broadcast": [
        "master broadcasts:",
        "worker 1 heard 'hi from the master' from the master",
        "worker 2 heard 'hi from the master' from the master",
        "worker 3 heard 'hi from the master' from the master",
        "worker 1 broadcasts:",
        "worker 2 heard 'hi from worker 1' from worker 1",
        "worker 3 heard 'hi from worker 1' from worker 1",
    ],
    "requests": [
        "master: 3 + 4 = 7",
        "worker 1: 1 + 2 = 3 (answered by the master)",
        "master: 5 * 6 = 30 (answered by worker 1, error=None)",
    ],
    "die_request": [
        "worker 1: got 'what is 6 * 7?', exiting without an answer",
        "master: request ended with WorkerDied: worker 1 has exited",
        "master: worker 1 exit code 0",
    ],
    "locks": [
        "master: holding foo for a second",
        "master: releasing foo",
        "worker 1: got foo",
        "worker 1: got bar while holding foo",
        "worker 1: released bar",
        "worker 1: released foo",
        "worker 1: got foo again",
        "master: worker exited with 0; foo is locked: False",
    ],
    "quickstart": [
        "worker 1: 0 + 1 = 1",
        "worker 2: 1 + 1 = 2",
        "worker 3: 2 + 1 = 3",
        "{1: 4, 2: 4, 3: 4}",
        "exit codes: [0, 0, 0]",
    ],
    "die_lock": [
        "worker 1: got foo (recovered=False), exits without unlocking",
        "master: worker 1 ended with exit code 0",
        "worker 2: got foo (recovered=True), is killed without unlocking",
        "master: worker 2 ended with exit code -9",
        "master: got foo (recovered=True)",
    ],
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_output(name):
    """Each example exits 0, prints exactly its expected lines in order, and nothing on stderr."""
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / f"{name}.py")],
        capture_output=True, text=True, timeout=50,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == EXPECTED[name]
    assert proc.stderr == ""


def _readme_section(title):
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return m.group(1)


def test_readme_quickstart_is_the_example():
    """The README's quickstart code is examples/quickstart.py, byte for byte."""
    blocks = re.findall(r"^```python\n(.*?)^```$", _readme_section("Quickstart"), re.S | re.M)
    assert len(blocks) == 1, "the Quickstart section should have exactly one python block"
    assert blocks[0] == (EXAMPLES / "quickstart.py").read_text(encoding="utf-8")


def test_readme_quickstart_output_is_the_expected():
    """The output the README shows for the quickstart is what the test expects."""
    blocks = re.findall(r"^```text\n(.*?)^```$", _readme_section("Quickstart"), re.S | re.M)
    assert len(blocks) == 1, "the Quickstart section should show its output in one text block"
    assert blocks[0].splitlines() == EXPECTED["quickstart"]


@pytest.mark.timeout(200)
def test_quickstart_is_deterministic():
    """Run several times, the quickstart prints the same lines in the same order."""
    for run in range(5):
        proc = subprocess.run(
            [sys.executable, str(EXAMPLES / "quickstart.py")],
            capture_output=True, text=True, timeout=35,
        )
        assert proc.returncode == 0, (run, proc.stderr)
        assert proc.stdout.splitlines() == EXPECTED["quickstart"], run
        assert proc.stderr == "", run


@pytest.mark.timeout(120)
def test_demo_runs():
    """`python -m clusterhub demo` explains itself and exits 0."""
    proc = subprocess.run(
        [sys.executable, "-m", "clusterhub", "demo"],
        capture_output=True, text=True, timeout=100,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for needle in ("request", "broadcast", "WorkerDied", "recovered=True"):
        assert needle in out, out


# The servers' recipes (README, "Servers: ...") are excerpts of the examples
# that tests/integration runs with the real servers: every code line of a
# recipe is a line of its example.
RECIPES = {
    "**gunicorn**": "gunicorn_conf.py",
    "**uvicorn `--workers N`": "uvicorn_main.py",
    "**Celery**": "celery_tasks.py",
}


@pytest.mark.parametrize("lead", sorted(RECIPES))
def test_readme_server_recipes_are_the_examples(lead):
    section = _readme_section("Processes the hub did not fork")
    start = section.index(lead)
    block = re.search(r"^```python\n(.*?)^```$", section[start:], re.S | re.M)
    assert block, f"no python block after {lead}"
    example = {line.split("#")[0].strip() for line in (EXAMPLES / RECIPES[lead]).read_text().splitlines()}
    missing = [line for line in block.group(1).splitlines()
               if line.split("#")[0].strip() and line.split("#")[0].strip() not in example]
    assert not missing, f"README lines not in examples/{RECIPES[lead]}: {missing}"
