"""Bad input, as a user meets it, for all five scripts (tables in tests/cases/): each case ends in exactly one
`error:` line naming the problem, exit status 2 (usage) or 1 (data), no traceback, and no run folder (the run fails
before it would start).

Every case runs in this process (`run_in_process`: the script's `__main__` path with its argv, no new Python and no
new torch/JAX import, so a case costs milliseconds to seconds instead of 10-40 s). One case per script also runs as a
real subprocess (`run_script`), to prove the user's path end to end: an error raised after the data loaded.
"""

import ast
import inspect
import json
import math
import re
import runpy
import shutil
from pathlib import Path

import pytest
from hsl_cases import BAD_INPUTS as HSL_BAD_INPUTS
from hsl_cases import DPO_BAD_INPUTS, write_bad_files
from keystate_cases import BAD_INPUTS as KEYSTATE_BAD_INPUTS
from keystate_cases import HIQL_BAD_INPUTS, write_bad_inputs
from oir_cases import BAD_INPUTS as OIR_BAD_INPUTS
from oir_cases import write_bad_inputs as write_oir_bad_inputs

REPO = Path(__file__).resolve().parents[1]

TABLES = {
    "keystate_gciql.py": KEYSTATE_BAD_INPUTS,
    "keystate_hiql.py": {**KEYSTATE_BAD_INPUTS, **HIQL_BAD_INPUTS},
    "hsl_sft.py": HSL_BAD_INPUTS,
    "hsl_dpo.py": {**HSL_BAD_INPUTS, **DPO_BAD_INPUTS},
    "oir_pqn.py": OIR_BAD_INPUTS,
}
# One case per script also runs as a subprocess, the user's path end to end (exit status and stderr of a real
# process): an error raised after the data loaded. The in-process runner executes the same `__main__` code, so more
# subprocess cases would only repeat the interpreter's start-up and imports (10-40 s each on CI).
SUBPROCESS = {
    "keystate_gciql.py": ["rules-not-json"],
    "keystate_hiql.py": ["rules-binary"],
    "hsl_sft.py": ["resume-corrupt-state"],
    "hsl_dpo.py": ["model-name-not-a-model"],
    "oir_pqn.py": ["embed-model-not-a-model"],
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
def base_command(request, tmp_path):
    """(argv, cwd, run folder) of a valid small run of a script: each case adds its flags after it (the last one
    wins)."""

    def build(script: str):
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
        return base, cwd, runs

    return build


@pytest.fixture
def command(base_command, bad_files):
    """(argv, cwd, the run folder that must not appear, (status, regex)) of one table case: a valid command line for
    the script, then the case's flags."""

    def build(script: str, case: str):
        flags, status, named = TABLES[script][case]
        flags = [f.format(**bad_files[script.split("_")[0]]) for f in flags]
        base, cwd, runs = base_command(script)
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


# ------------------------------------------------------------------------------- cases generated from Args and RANGES
# Every int and float field of each script's Args, read from the source (no import at collection), gets values
# outside any range a run could need, and every path field gets broken files: a new field is covered the day it is
# added, without anyone writing a case. The exact bounds are tested next to them (test_declared_ranges_are_exact).
SCRIPTS = list(TABLES)
# What each str field of Args is. A new str field fails test_every_str_field_is_classified until it is added here.
PATH_FIELDS = {
    "keystate": {"run_dir": "out", "dataset_path": "file", "rules_path": "file"},
    "hsl": {
        "run_dir": "out",
        "data_dir": "folder",
        "demos_path": "file",
        "model_name": "model",
        "eto_prompts": "folder",
        "resume": "folder",
    },
    "oir": {"run_dir": "out", "resume": "file", "prompts_dir": "folder", "embed_model": "model"},
}
# names, URLs and hub ids (llm_model is a name sent to the endpoint with the default backend)
OTHER_STR_FIELDS = {"exp_name", "wandb_project_name", "env_name", "llm_model", "llm_base_url"}
OUTSIDE = {
    "int": ["-1000000000000", "1" + "0" * 30],
    "float": ["-1e30", "1e30", "inf", "-inf", "nan"],
}


def args_fields(script: str) -> dict:
    """{field: annotation source} of the script's Args dataclass."""
    tree = ast.parse((REPO / script).read_text())
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    return {
        n.target.id: ast.unparse(n.annotation) for n in args.body if isinstance(n, ast.AnnAssign)
    }


def numeric_kind(annotation: str):
    """'int' / 'float' for int, float, Optional[...] of them and Tuple[int, ...]; None otherwise."""
    return next((k for k in ("int", "float") if re.search(rf"\b{k}\b", annotation)), None)


NUMERIC_CASES = [
    (script, field, value)
    for script in SCRIPTS
    for field, annotation in args_fields(script).items()
    if numeric_kind(annotation)
    for value in OUTSIDE[numeric_kind(annotation)]
]


@pytest.mark.parametrize(
    "script,field,value",
    NUMERIC_CASES,
    ids=[f"{s.removesuffix('.py')}-{f}={v[:8]}" for s, f, v in NUMERIC_CASES],
)
def test_generated_numeric_flag_outside_every_range(
    run_in_process, base_command, script, field, value
):
    base, cwd, runs = base_command(script)
    flag = "--" + field.replace("_", "-")
    check(run_in_process(script, *base, flag, value, cwd=cwd), runs, (2, re.escape(flag)))


def broken_files(folder: Path) -> dict:
    """name -> a file whose content no reader may accept."""
    folder.mkdir(parents=True, exist_ok=True)
    content = {
        "empty": b"",
        "binary": bytes(range(256)) * 16,
        "nested-json": b"[" * 100_000,
        "nested-object": b'{"a": ' * 100_000,
    }
    files = {}
    for name, data in content.items():
        files[name] = folder / f"{name}.json"
        files[name].write_bytes(data)
    return files


def spoiled_copy(template: Path, out: Path, data: bytes) -> Path:
    """A copy of a folder with every file's content replaced by `data` (names kept, so the reader opens them)."""
    shutil.copytree(template, out)
    for f in out.rglob("*"):
        if f.is_file():
            f.write_bytes(data)
    return out


def folder_template(script: str, field: str, request, tmp_path: Path) -> Path:
    """A valid folder for a folder field, to spoil: what the script reads from it, with the right names."""
    if field == "data_dir":
        return Path(request.getfixturevalue("put_games"))
    if field == "eto_prompts":
        from runs import short_eto_prompts

        return Path(short_eto_prompts())
    if field == "prompts_dir":
        return REPO / "prompts"
    checkpoint = (
        tmp_path / "checkpoint_template"
    )  # hsl_sft.py's checkpoint folder: its state file first
    checkpoint.mkdir()
    (checkpoint / "hsl_state.json").write_text("{}")
    return checkpoint


PATH_VARIANTS = {
    "file": ["missing", "a-folder", "empty", "binary", "nested-json", "nested-object"],
    "out": ["a-file", "under-proc"],
    "folder": ["missing", "a-file", "empty-folder", "empty", "binary", "nested-json"],
    "model": ["missing", "a-file", "empty-folder", "binary"],
}
# oir_pqn.py reads a checkpoint only after its jitted init (5-10 s a case): one broken content here, the others
# (empty, truncated, nested, wrong keys and types) in tests/test_oir_pqn.py::test_damaged_checkpoint_is_one_error_line,
# which calls load_checkpoint directly.
SLOW = {("oir_pqn.py", "resume"): ["missing", "a-folder", "binary"]}
PATH_CASES = [
    (script, field, variant)
    for script in SCRIPTS
    for field, kind in PATH_FIELDS[script.split("_")[0]].items()
    for variant in SLOW.get((script, field), PATH_VARIANTS[kind])
]


@pytest.mark.parametrize(
    "script,field,variant",
    PATH_CASES,
    ids=[f"{s.removesuffix('.py')}-{f}-{v}" for s, f, v in PATH_CASES],
)
def test_generated_broken_path(
    run_in_process, base_command, request, tmp_path, script, field, variant
):
    """Each path field given a place or a file that cannot serve: one `error:` line naming the flag or the file,
    exit 1 or 2, no traceback, no run folder."""
    base, cwd, runs = base_command(script)
    kind = PATH_FIELDS[script.split("_")[0]][field]
    files = broken_files(tmp_path / "broken")
    if variant == "missing":
        value = tmp_path / "no_such_place" / "x"
    elif variant == "a-folder" or variant == "empty-folder":
        value = tmp_path / "a_folder"
        value.mkdir()
    elif variant == "a-file":
        value = files["binary"]
    elif variant == "under-proc":
        value = Path("/proc/no_such_process/runs")
    elif kind == "folder":
        data = files[variant].read_bytes()
        template = folder_template(script, field, request, tmp_path)
        value = spoiled_copy(template, tmp_path / f"spoiled_{field}", data)
    else:
        value = files[variant]
    if field == "run_dir":  # the place given cannot hold a folder: nothing to look for there
        runs = tmp_path / "no_run_folder_expected"
    result = run_in_process(script, *base, "--" + field.replace("_", "-"), value, cwd=cwd)
    named = f"--{field.replace('_', '-')}|{re.escape(str(value))}"
    assert result.returncode in (1, 2), (result.returncode, result.output[-3000:])
    check(result, runs, (result.returncode, named))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_str_field_is_classified(script):
    """A new str field is a path (and gets generated cases) or a name: it cannot go untested by omission."""
    paths = PATH_FIELDS[script.split("_")[0]]
    for field, annotation in args_fields(script).items():
        if re.search(r"\bstr\b", annotation):
            assert field in paths or field in OTHER_STR_FIELDS, f"{script}: classify Args.{field}"
    assert set(paths) <= set(args_fields(script)), script


@pytest.mark.parametrize("script", SCRIPTS)
def test_declared_ranges_are_exact(script, request, capsys):
    """RANGES covers every numeric field exactly once; check_args rejects the nearest value outside each bound (usage
    error naming the flag) and does not reject the bounds themselves on range grounds."""
    module = runpy.run_path(str(REPO / script), run_name="ranges")
    numeric = {f for f, a in args_fields(script).items() if numeric_kind(a)}
    declared = [name for _, _, names in module["RANGES"] for name in names]
    assert sorted(declared) == sorted(numeric), set(declared) ^ numeric
    base = {}
    if script.startswith("hsl"):
        base = dict(
            data_dir=str(request.getfixturevalue("put_games")),
            model_name=str(request.getfixturevalue("tiny_lm_dir")),
        )
    elif script.startswith("oir"):
        base = dict(embed_model=str(request.getfixturevalue("minilm_dir")))
    check_args = module["check_args"]
    extra = [REPO / "prompts"] if len(inspect.signature(check_args).parameters) > 1 else []
    annotations = args_fields(script)

    def error_for(name, value):
        if "Tuple" in annotations[name]:
            value = (value,)
        try:
            check_args(module["Args"](**base, **{name: value}), *extra)
        except SystemExit as e:
            return e.code, capsys.readouterr().err
        return 0, ""

    for low, high, names in module["RANGES"]:
        for name in names:
            flag = "--" + name.replace("_", "-")
            if numeric_kind(annotations[name]) == "int":
                outside = [low - 1, high + 1]
            else:
                outside = [math.nextafter(low, -math.inf), math.nextafter(high, math.inf)]
            for value in outside:
                code, err = error_for(name, value)
                assert code == 2 and f"error: {flag}: must be in" in err, (name, value, err)
            for value in (low, high):
                code, err = error_for(name, value)
                assert f"{flag}: must be in" not in err, (name, value, err)


# ------------------------------------------------------------------------------- flag products beyond the memory
# Each flag within its range, their product beyond the device's memory: the JAX scripts compile their jitted step for
# the run's shapes and check XLA's memory plan against the device (RAM on a CPU) before any of it is allocated.
@pytest.mark.parametrize("script", ["keystate_gciql.py", "keystate_hiql.py", "oir_pqn.py"])
def test_memory_check_rejects_a_plan_beyond_the_machine(script, capsys):
    """check_memory, given shapes only: a step whose plan needs 4 TiB (beyond any machine) is one `error:` line
    naming the flags, exit 2; a step that fits comes back compiled, and computes."""
    import jax
    import jax.numpy as jnp

    check_memory = runpy.run_path(str(REPO / script), run_name="memory")["check_memory"]
    step = jax.jit(lambda x: (x @ x.T).argmax(1))  # a (n, n) temporary
    assert check_memory(step, jnp.eye(3))(jnp.eye(3)).tolist() == [0, 1, 2]
    with pytest.raises(SystemExit) as e:
        check_memory(step, jax.ShapeDtypeStruct((2**20, 8), jnp.float32))  # 2**40 floats
    assert e.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        r"error: --num-(seeds|envs) x .*needs 409\d\.\d GiB, this machine has [\d.]+ GiB", line
    )


def test_flag_product_beyond_memory_stops_before_training(run_in_process, base_command):
    """The wiring, end to end (keystate_hiql.py's main is the same code, tests/test_siblings.py): 64 seeds x 65,536
    rows x 16,384 units need petabytes; the agents' state is only traced, never allocated; one line, no run folder."""
    base, cwd, runs = base_command("keystate_gciql.py")
    huge = ["--num-seeds", "64", "--batch-size", "65536", "--hidden-dims", "16384", "16384"]
    one_step = [
        "--total-steps",
        "1",
        "--log-interval",
        "1",
        "--adapt-interval",
        "0",
    ]  # the cheapest compile
    result = run_in_process("keystate_gciql.py", *base, *huge, *one_step, cwd=cwd)
    check(result, runs, (2, r"--num-seeds x --batch-size x --hidden-dims.* needs \d+\.\d GiB"))
