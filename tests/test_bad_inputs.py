"""Bad input, as a user meets it, for all five scripts (tables in tests/cases/): each case ends in exactly one
`error:` line naming the problem, exit status 2 (usage) or 1 (data), no traceback, and no run folder (the run fails
before it would start).

Every case runs in this process (`run_in_process`: the script's `__main__` path with its argv, no new Python and no
new torch/JAX import, so a case costs milliseconds to seconds instead of 10-40 s). Three cases per script also run as
real subprocesses (`run_script`), to prove the user's path end to end: a usage error, a data error, and an error raised
after the data loaded.
"""

import json
import re

import pytest
from hsl_cases import BAD_INPUTS as HSL_BAD_INPUTS
from hsl_cases import DPO_BAD_INPUTS, write_bad_files
from keystate_cases import BAD_INPUTS as KEYSTATE_BAD_INPUTS
from keystate_cases import HIQL_BAD_INPUTS, write_bad_inputs
from oir_cases import BAD_INPUTS as OIR_BAD_INPUTS
from oir_cases import write_bad_inputs as write_oir_bad_inputs

TABLES = {
    "keystate_gciql.py": KEYSTATE_BAD_INPUTS,
    "keystate_hiql.py": {**KEYSTATE_BAD_INPUTS, **HIQL_BAD_INPUTS},
    "hsl_sft.py": HSL_BAD_INPUTS,
    "hsl_dpo.py": {**HSL_BAD_INPUTS, **DPO_BAD_INPUTS},
    "oir_pqn.py": OIR_BAD_INPUTS,
}
# (usage error, data error, error after the data loaded) per script, also run as subprocesses
SUBPROCESS = {
    "keystate_gciql.py": ["batch-size-0", "npz-nan", "rules-not-json"],
    "keystate_hiql.py": ["subgoal-steps-0", "npz-corrupt-member", "rules-binary"],
    "hsl_sft.py": ["batch-size-0", "demos-not-json", "resume-corrupt-state"],
    "hsl_dpo.py": ["dpo-beta-0", "demos-binary", "model-name-not-a-model"],
    "oir_pqn.py": ["num-envs-not-multiple", "seeds-no-separator", "embed-model-not-a-model"],
}
CASES = [(script, case) for script, table in TABLES.items() for case in table]

# Small but real settings: a case that passes every check would train on these (and fail the test: exit 0)
KEYSTATE_SMALL = [
    "--env-name",
    "pointmaze-medium-navigate-v0",
    "--total-steps",
    "60",
    "--batch-size",
    "64",
]
KEYSTATE_SMALL += ["--hidden-dims", "32", "32", "--log-interval", "20", "--eval-every", "0"]
KEYSTATE_SMALL += ["--eval-episodes", "1", "--adapt-interval", "10"]
OIR_TINY = [
    "--total-timesteps",
    "6144",
    "--num-envs",
    "48",
    "--num-steps",
    "8",
    "--chunk-updates",
    "8",
]
OIR_TINY += [
    "--hidden-size",
    "64",
    "--num-layers",
    "2",
    "--num-minibatches",
    "2",
    "--eval-every",
    "0",
]
STOP_RULE = {
    "name": "stop",
    "description": "nearly at rest",
    "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15",
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    """{family: {placeholder: path}}: the files each family's table names."""
    folder = tmp_path_factory.mktemp("bad")
    return {
        "keystate": write_bad_inputs(folder / "keystate"),
        "hsl": write_bad_files(folder / "hsl"),
        "oir": write_oir_bad_inputs(folder / "oir"),
    }


@pytest.fixture
def command(request, tmp_path, bad_files):
    """(script, argv, cwd, the run folder that must not appear, (status, regex)) of one case: a valid command line
    for the script, then the case's flags (the last one wins)."""

    def build(script: str, case: str):
        flags, status, named = TABLES[script][case]
        flags = [f.format(**bad_files[script.split("_")[0]]) for f in flags]
        runs, cwd = tmp_path / "runs", None
        if script.startswith("keystate"):
            rules = tmp_path / "rules.json"
            rules.write_text(json.dumps({"rules": [STOP_RULE]}))
            npz = request.getfixturevalue("pointmaze_npz")
            base = [
                *KEYSTATE_SMALL,
                "--dataset-path",
                npz,
                "--rules-path",
                rules,
                "--run-dir",
                runs,
            ]
        elif script.startswith("hsl"):
            games, lm = request.getfixturevalue("put_games"), request.getfixturevalue("tiny_lm_dir")
            base = [
                "--data-dir",
                games,
                "--model-name",
                lm,
                "--relabeler",
                "oracle",
                "--run-dir",
                runs,
            ]
        else:  # oir_pqn.py writes runs/ in its working folder
            minilm, cwd = request.getfixturevalue("minilm_dir"), tmp_path
            base = [
                *OIR_TINY,
                "--relabel",
                "template",
                "--embed-model",
                minilm,
                "--llm-timeout",
                "5",
            ]
        return [*base, *flags], cwd, runs, (status, named)

    return build


def check(result, runs, expected):
    status, named = expected
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(named, errors[0]), result.output[-3000:]
    assert result.returncode == status, (result.returncode, result.output[-3000:])
    assert "Traceback" not in result.output and not runs.exists()


@pytest.mark.parametrize(
    "script,case", CASES, ids=[f"{s.removesuffix('.py')}-{c}" for s, c in CASES]
)
def test_bad_input_in_process(run_in_process, command, script, case):
    argv, cwd, runs, expected = command(script, case)
    check(run_in_process(script, *argv, cwd=cwd), runs, expected)


SUBPROCESS_CASES = [(script, case) for script, cases in SUBPROCESS.items() for case in cases]


@pytest.mark.parametrize(
    "script,case",
    SUBPROCESS_CASES,
    ids=[f"{s.removesuffix('.py')}-{c}" for s, c in SUBPROCESS_CASES],
)
def test_bad_input_as_a_user_runs_it(run_script, command, script, case):
    argv, cwd, runs, expected = command(script, case)
    check(run_script(script, *argv, cwd=cwd, check=False, timeout=300), runs, expected)


def test_every_table_names_its_subprocess_cases():
    """The subprocess cases are cases of the tables (a renamed case cannot silently drop out)."""
    for script, cases in SUBPROCESS.items():
        assert set(cases) <= set(TABLES[script]), script
