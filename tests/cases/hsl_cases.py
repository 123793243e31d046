"""Bad inputs a careless user can pass to hsl_sft.py / hsl_dpo.py (issue 12 part 2), as one table for both tests.

BAD_INPUTS: name -> (extra flags, exit status, regex the one `error:` line must match). Status 2: a usage error
(a flag out of range, a path that does not exist); status 1: a data error (the file exists but is bad). `{name}` in a
flag is a file from write_bad_files(). DPO_BAD_INPUTS: the DPO flags (hsl_dpo.py only).
"""

import json
from pathlib import Path

BAD_INPUTS = {
    "batch-size-0": (["--batch-size", "0"], 2, r"--batch-size: must be in \[1, 65536\], got 0"),
    "batch-size-negative": (
        ["--batch-size", "-1"],
        2,
        r"--batch-size: must be in \[1, 65536\], got -1",
    ),
    "micro-batch-size-0": (
        ["--micro-batch-size", "0"],
        2,
        r"--micro-batch-size: must be in \[1, 65536\], got 0",
    ),
    "rollouts-per-step-0": (
        ["--rollouts-per-step", "0"],
        2,
        r"--rollouts-per-step: must be in \[1, 65536\], got 0",
    ),
    "buffer-size-0": (["--buffer-size", "0"], 2, r"--buffer-size: must be in \[1, 65536\], got 0"),
    "num-demos-0": (["--num-demos", "0"], 2, r"--num-demos: must be in \[1, 65536\], got 0"),
    "learning-rate-0": (
        ["--learning-rate", "0"],
        2,
        r"--learning-rate: must be in \[1e-09, 1\.0\], got 0",
    ),
    "hsl-lambda-above-1": (
        ["--hsl-lambda", "1.5"],
        2,
        r"--hsl-lambda: must be in \[0\.0, 1\.0\], got 1\.5",
    ),
    "hsl-steps-below-minus-1": (
        ["--hsl-steps", "-2"],
        2,
        r"--hsl-steps: must be in \[-1, 1000000000\], got -2",
    ),
    "sft-epochs-negative": (
        ["--sft-epochs", "-1"],
        2,
        r"--sft-epochs: must be in \[0\.0, 1000\.0\], got -1",
    ),
    "eval-every-negative": (
        ["--eval-every", "-1"],
        2,
        r"--eval-every: must be in \[0, 4294967295\], got -1",
    ),
    "max-seq-len-too-short": (
        ["--max-seq-len", "32"],
        2,
        r"--max-seq-len: must be > --agent-max-new-tokens \(512\), got 32",
    ),
    "data-dir-missing": (
        ["--data-dir", "{missing}"],
        2,
        r"--data-dir: must be a folder with json_2\.1\.1",
    ),
    "run-dir-is-a-file": (
        ["--run-dir", "{text_json}"],
        1,
        r"--run-dir: cannot create or write .*text\.json \(NotADirectoryError",
    ),
    "run-dir-cannot-be-created": (
        ["--run-dir", "/proc/hsl_runs"],
        1,
        r"--run-dir: cannot create or write /proc/hsl_runs \((FileNotFoundError|PermissionError)",
    ),
    "seed-negative": (["--seed", "-1"], 2, r"--seed: must be in \[0, 4294967295\], got -1"),
    "seed-too-large": (
        ["--seed", str(2**64)],
        2,
        r"--seed: must be in \[0, 4294967295\], got 18446744073709551616",
    ),
    "learning-rate-inf": (
        ["--learning-rate", "inf"],
        2,
        r"--learning-rate: must be in \[1e-09, 1\.0\], got inf",
    ),
    "learning-rate-nan": (["--learning-rate", "nan"], 2, r"--learning-rate: must be in .*got nan"),
    "sft-epochs-inf": (["--sft-epochs", "inf"], 2, r"--sft-epochs: must be in .*got inf"),
    "llm-timeout-0": (["--llm-timeout", "0"], 2, r"--llm-timeout: must be in \[1\.0, 86400\.0\]"),
    "demos-path-missing": (
        ["--demos-path", "{missing}"],
        2,
        r"--demos-path: must be an existing file",
    ),
    "eto-prompts-missing": (
        ["--eto-prompts", "{missing}"],
        2,
        r"--eto-prompts: must be ETO's prompt folder",
    ),
    "model-name-missing": (
        ["--model-name", "{missing}"],
        2,
        r"--model-name: must be a local folder or a hub id",
    ),
    "resume-missing": (
        ["--resume", "{missing}"],
        2,
        r"--resume: must be a checkpoint, got .*missing",
    ),
    "demos-binary": (
        ["--demos-path", "{binary_json}"],
        1,
        r"binary\.json: not ETO format .*can't decode",
    ),
    "demos-not-json": (
        ["--demos-path", "{text_json}"],
        1,
        r"text\.json: not ETO format .*JSONDecodeError",
    ),
    "demos-null": (["--demos-path", "{null_json}"], 1, r"null\.json: not ETO format \(TypeError"),
    "demos-null-turn": (
        ["--demos-path", "{null_turn_json}"],
        1,
        r"null_turn\.json: not ETO format \(TypeError",
    ),
    "demos-non-string-turn": (
        ["--demos-path", "{int_turn_json}"],
        1,
        r"int_turn\.json: conversation 0: turns must alternate human, gpt, .*each a string",
    ),
    "demos-wrong-turn-order": (
        ["--demos-path", "{turn_order_json}"],
        1,
        r"turn_order\.json: conversation 1: turns must alternate .*got \['human', 'gpt', 'gpt'",
    ),
    "demos-deeply-nested": (
        ["--demos-path", "{nested_json}"],
        1,
        r"nested\.json: not ETO format \(RecursionError",
    ),
    "eto-prompts-broken-example": (
        ["--eto-prompts", "{eto_broken}"],
        1,
        r"eto_broken: not ETO's prompt folder \(JSONDecodeError",
    ),
    "eto-prompts-empty-example": (
        ["--eto-prompts", "{eto_empty}"],
        1,
        r"eto_empty: not ETO's prompt folder \(IndexError",
    ),
    "demos-no-task-turn": (
        ["--demos-path", "{no_task_json}"],
        1,
        r"no_task\.json: no item has a human 'Your task",
    ),
    "model-name-not-a-model": (
        ["--model-name", "{empty_dir}"],
        1,
        r"empty: cannot load a tokenizer and causal LM \((OSError|ValueError)",
    ),
    "resume-corrupt-state": (
        ["--resume", "{corrupt_ckpt}"],
        1,
        r"corrupt_ckpt: cannot load a tokenizer and causal LM",
    ),
    "llm-endpoint-down": (
        ["--relabeler", "llm", "--llm-base-url", "http://127.0.0.1:9/v1", "--llm-timeout", "3"],
        1,
        r"--llm-base-url http://127.0.0.1:9/v1: no OpenAI-compatible server answers",
    ),
}
DPO_BAD_INPUTS = {
    "dpo-batch-size-0": (
        ["--dpo-batch-size", "0"],
        2,
        r"--dpo-batch-size: must be in \[1, 65536\], got 0",
    ),
    "dpo-iterations-negative": (
        ["--dpo-iterations", "-1"],
        2,
        r"--dpo-iterations: must be in \[0, 4294967295\], got -1",
    ),
    "dpo-beta-0": (["--dpo-beta", "0"], 2, r"--dpo-beta: must be in \[0\.001, 10\.0\], got 0"),
    "dpo-learning-rate-0": (
        ["--dpo-learning-rate", "0"],
        2,
        r"--dpo-learning-rate: must be in \[1e-09, 1\.0\], got 0",
    ),
}

TASK = "You are in the middle of a room. Looking quickly around you, you see a shelf 1.\nYour task is to: put a mug on shelf."


def write_bad_files(folder: Path) -> dict:
    """The files BAD_INPUTS names; returns {name: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"missing": folder / "missing" / "nothing_here"}
    turns = [{"from": "human", "value": TASK}, {"from": "gpt", "value": "Action: go to shelf 1"}]
    for name, data in {
        "null": None,
        "null_turn": [{"id": "a", "conversations": [turns[0], None]}],
        "int_turn": [{"id": "a", "conversations": [*turns, {"from": "human", "value": 3}]}],
        "no_task": [{"id": "a", "conversations": [{"from": "human", "value": "hello"}, turns[1]]}],
        # the second conversation's turns out of order: two gpt turns, then two human turns
        "turn_order": [
            {"id": "a", "conversations": turns},
            {"id": "b", "conversations": [turns[0], turns[1], turns[1], turns[0], turns[0]]},
        ],
    }.items():
        files[f"{name}_json"] = folder / f"{name}.json"
        files[f"{name}_json"].write_text(json.dumps(data))
    files["text_json"] = folder / "text.json"
    files["text_json"].write_text("[{'id': 'a', 'conversations': [ not json")
    files["binary_json"] = folder / "binary.json"
    files["binary_json"].write_bytes(bytes(range(128, 256)) * 4)
    files["nested_json"] = folder / "nested.json"
    files["nested_json"].write_text("[" * 100_000 + "]" * 100_000)
    for name, icl in {"eto_broken": "[[{'role': 'user'", "eto_empty": "[]"}.items():
        files[name] = folder / name
        (files[name] / "instructions").mkdir(parents=True, exist_ok=True)
        (files[name] / "icl_examples").mkdir(exist_ok=True)
        (files[name] / "instructions" / "alfworld_inst.txt").write_text("Act.")
        (files[name] / "icl_examples" / "alfworld_icl.json").write_text(icl)
    files["empty_dir"] = folder / "empty"
    files["empty_dir"].mkdir(exist_ok=True)
    files["corrupt_ckpt"] = folder / "corrupt_ckpt"
    files["corrupt_ckpt"].mkdir(exist_ok=True)
    (files["corrupt_ckpt"] / "hsl_state.json").write_text('{"sft_steps": 1, "buff')
    return files
