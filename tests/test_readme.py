"""README's quick starts run as written (issue: a newcomer's first hour).

Every fenced block right after a `<!-- quick-start: NAME (about N s) -->` line in README.md is run here the way a user
runs it, with bash, offline, in a fresh folder holding the scripts, `prompts/` and `tests/` (linked, not copied), so
README and code cannot drift apart. A block must exit 0, print no traceback, and leave a run folder with TensorBoard
events for each training command it holds. The time in the marker is what README promises; it is measured on the
project's 2-core machine and printed here, not asserted (no wall-clock assertions in tests).
"""

import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- quick-start: ([\w-]+) \(about (\d+) s\) -->\n```bash\n(.*?)\n```", re.S)
MAIN_COMMAND = re.compile(r"<!-- main-command -->\n```bash\n(.*?)\n```", re.S)
# What a quick start must print besides its plan: that it trained, relabeled and evaluated (the checks of the smoke
# runs these blocks replaced). oir: SmolLM2 in process answered every relabel request.
MUST_PRINT = {
    "keystate": [r"^done: 200 gradient steps", r"^eval step=200 "],
    "hsl-sft": [r"^\[eval final\] step 1 "],
    "hsl-dpo": [r"^\[results\] DPO "],
    "oir": [
        r"^done: \d+ env steps, [1-9]\d* gradient steps, \d+ relabeled instructions accepted "
        r"\([1-9]\d* LLM requests, 0 failed",
        r"^eval coverage \d+/58 ",
        r"^\[llm\] \d+ request\(s\), \d+ at a time: ",
    ],
}


def quick_starts() -> dict:
    return {
        name: (int(seconds), block)
        for name, seconds, block in MARKER.findall((REPO / "README.md").read_text())
    }


def one_line(command: str) -> str:
    return " ".join(command.replace("\\\n", " ").split())


def test_main_command_is_the_oir_quick_start():
    """README's one-line "Run a method" command is the install, then the OIR quick start, which the test below runs."""
    main = MAIN_COMMAND.search((REPO / "README.md").read_text()).group(1)
    run = main.split(" && ")[-1].removeprefix("OMP_NUM_THREADS=1 ")
    assert one_line(run) == one_line(quick_starts()["oir"][1])


def test_readme_has_a_quick_start_per_family():
    names = set(quick_starts())
    assert {"keystate", "hsl-sft", "hsl-dpo", "oir"} <= names, names
    for name, (_, block) in quick_starts().items():
        assert "..." not in block and "<" not in block, f"{name}: a placeholder in a quick start"


@pytest.mark.parametrize("name", sorted(quick_starts()))
def test_quick_start_runs_as_written(name, tmp_path):
    seconds, block = quick_starts()[name]
    for entry in [
        "keystate_gciql.py",
        "keystate_hiql.py",
        "hsl_sft.py",
        "hsl_dpo.py",
        "oir_pqn.py",
        "prompts",
        "tests",
    ]:
        (tmp_path / entry).symlink_to(REPO / entry)
    start = time.time()
    r = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    took = time.time() - start
    print(f"quick start {name}: {took:.0f} s (README says about {seconds} s)")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    trainings = len(re.findall(r"^python (keystate_\w+|hsl_\w+|oir_pqn)\.py", block, re.M))
    events = list((tmp_path / "runs").glob("*/events.out.tfevents.*"))
    assert len({e.parent for e in events}) == trainings, (trainings, events, out[-2000:])
    # each training command says what it will do at its start (steps, evaluations)
    assert len(re.findall(r"^\[plan\] ", r.stdout + r.stderr, re.M)) >= trainings, out[-2000:]
    for pattern in MUST_PRINT[name]:
        assert re.search(pattern, out, re.M), (pattern, out[-3000:])
