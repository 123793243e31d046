"""Bad inputs for oir_pqn.py (issue 12, part 2): what a careless user can pass, and the one line each must end in.

BAD_INPUTS maps a case name to (flags, exit status, regex the single `error:` line must match). Exit status 2 is a
usage error (a range, a divisibility, a path that does not exist), 1 a data error (a file that exists but is wrong).
Flags may name files that `write_bad_inputs` builds: `{name}` placeholders.
"""

import shutil
import socket
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BAD_INPUTS = {
    "num-envs-0": (["--num-envs", "0"], 2, r"--num-envs: must be in \[1, 8192\], got 0"),
    "num-envs-not-multiple": (
        ["--num-envs", "20"],
        2,
        r"--num-envs: must be a multiple of 16, got 20",
    ),
    "num-minibatches-0": (
        ["--num-minibatches", "0"],
        2,
        r"--num-minibatches: must be in \[1, 65536\], got 0",
    ),
    "num-minibatches-not-dividing": (
        ["--num-minibatches", "7"],
        2,
        r"--num-minibatches: must be a divisor of 480 ",
    ),
    "total-timesteps-0": (
        ["--total-timesteps", "0"],
        2,
        r"--total-timesteps: must be in \[1, 1000000000\], got 0",
    ),
    "total-timesteps-below-chunk": (
        ["--total-timesteps", "100"],
        2,
        r"--total-timesteps: must be >= 3072",
    ),
    "chunk-updates-0": (
        ["--chunk-updates", "0"],
        2,
        r"--chunk-updates: must be in \[1, 65536\], got 0",
    ),
    "num-steps-0": (["--num-steps", "0"], 2, r"--num-steps: must be in \[1, 256\], got 0"),
    "hidden-size-negative": (
        ["--hidden-size", "-1"],
        2,
        r"--hidden-size: must be in \[1, 8192\], got -1",
    ),
    "lr-0": (["--lr", "0"], 2, r"--lr: must be in \[1e-09, 1.0\], got 0"),
    "delta-above-1": (["--delta", "1.5"], 2, r"--delta: must be in \[0.0, 1.0\], got 1.5"),
    "gamma-above-1": (["--gamma", "1.5"], 2, r"--gamma: must be in \[0.0, 1.0\], got 1.5"),
    "eval-every-negative": (
        ["--eval-every", "-1"],
        2,
        r"--eval-every: must be in \[0, 4294967295\], got -1",
    ),
    # issue 25: every numeric flag has a declared range (RANGES); these crashed or ran on before
    "seed-negative": (["--seed", "-1"], 2, r"--seed: must be in \[0, 4294967295\], got -1"),
    "seed-above-2-64": (
        ["--seed", str(2**64)],
        2,
        r"--seed: must be in \[0, 4294967295\], got 18446744073709551616",
    ),
    "total-timesteps-1e30": (
        ["--total-timesteps", str(10**30)],
        2,
        r"--total-timesteps: must be in \[1, 1000000000\], got 1000000000000000000000000000000",
    ),
    "eval-max-steps-1e12": (
        ["--eval-max-steps", str(10**12)],
        2,
        r"--eval-max-steps: must be in \[1, 65536\], got 1000000000000",
    ),
    "lr-inf": (["--lr", "inf"], 2, r"--lr: must be in \[1e-09, 1.0\], got inf"),
    "delta-nan": (["--delta", "nan"], 2, r"--delta: must be in \[0.0, 1.0\], got nan"),
    "num-envs-huge": (["--num-envs", str(2**20)], 2, r"--num-envs: must be in \[1, 8192\]"),
    "llm-timeout-inf": (
        ["--llm-timeout", "inf"],
        2,
        r"--llm-timeout: must be in \[1, 65536\], got inf",
    ),
    # --run-dir: the generated cases of tests/test_bad_inputs.py (a file, under /proc)
    "embed-model-missing": (
        ["--embed-model", "{missing}"],
        2,
        r"--embed-model: must be an existing folder or a hub",
    ),
    "prompts-dir-missing": (  # checked where it is read: a data error
        ["--prompts-dir", "{missing}"],
        1,
        r"relabel\.md: cannot read it",
    ),
    "resume-missing": (["--resume", "{missing}"], 2, r"--resume: must be an existing file"),
    "embed-model-not-a-model": (
        ["--embed-model", "{empty_dir}"],
        1,
        r"--embed-model .*empty: cannot load it",
    ),
    "llm-base-url-dead": (
        ["--relabel", "llm", "--llm-base-url", "{dead_url}"],
        1,
        r"--llm-base-url http://127\.0",
    ),
    "seeds-no-separator": (
        ["--prompts-dir", "{no_sep}"],
        1,
        r"no_sep/oir/seed_instructions\.md: no line '---'",
    ),
    "seeds-unknown-event": (
        ["--prompts-dir", "{bad_event}"],
        1,
        r"seed_instructions\.md:\d+: bad rule 'collect_unicorn >=1'",
    ),
    "eval-wrong-columns": (
        ["--prompts-dir", "{bad_columns}"],
        1,
        r"eval_instructions\.md:\d+: expected 3 columns",
    ),
    "relabel-bad-placeholder": (
        ["--prompts-dir", "{bad_placeholder}"],
        1,
        r"relabel\.md: .*placeholder.*'task'",
    ),
    "vocabulary-bad-change": (
        ["--prompts-dir", "{bad_change}"],
        1,
        r"transitions\.md:\d+: bad rule 'wood \*2'",
    ),
    "vocabulary-unknown-field": (
        ["--prompts-dir", "{bad_field}"],
        1,
        r"transitions\.md:\d+: bad rule 'mana \+'",
    ),
    "seed-rule-not-in-vocabulary": (
        ["--prompts-dir", "{seed_rule}"],
        1,
        r"seed_instructions\.md:\d+: 'wood >=7' is not a",
    ),
    "eval-bad-ground-truth": (
        ["--prompts-dir", "{bad_truth}"],
        1,
        r"eval_instructions\.md:\d+: bad rule 'wood'",
    ),
    "prompt-binary": (["--prompts-dir", "{binary}"], 1, r"binary/oir/relabel\.md: .*can't decode"),
    "prompt-empty": (
        ["--prompts-dir", "{empty_prompt}"],
        1,
        r"empty_prompt/oir/relabel\.md: no line '---'",
    ),
    "prompt-empty-body": (
        ["--prompts-dir", "{empty_body}"],
        1,
        r"empty_body/oir/eval_instructions\.md: no line '---' between the header and a body",
    ),
    "prompt-file-missing": (
        ["--prompts-dir", "{no_evals}"],
        1,
        r"no_evals/oir/eval_instructions\.md: cannot read it \(.*No such file",
    ),
    "prompt-not-utf8": (
        ["--prompts-dir", "{latin1}"],
        1,
        r"latin1/oir/seed_instructions\.md: cannot read it \(.*can't decode byte 0xe9",
    ),
}


def write_bad_inputs(folder: Path) -> dict:
    """The files and URLs BAD_INPUTS names; returns {name: str}. Each bad prompts folder is a copy of prompts/oir/
    with one file broken."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {"missing": str(folder / "missing"), "empty_dir": str(folder / "empty")}
    (folder / "empty").mkdir(exist_ok=True)
    out["a_file"] = str(folder / "a_file")
    (folder / "a_file").write_text("not a folder")
    with socket.socket() as s:  # a port where nothing listens
        s.bind(("127.0.0.1", 0))
        out["dead_url"] = f"http://127.0.0.1:{s.getsockname()[1]}/v1"

    def broken(name: str, file: str, edit):
        dst = folder / name / "oir"
        shutil.copytree(REPO / "prompts" / "oir", dst, dirs_exist_ok=True)
        path = dst / file
        data = edit(path.read_bytes())
        path.write_bytes(data)
        out[name] = str(folder / name)

    broken("no_sep", "seed_instructions.md", lambda b: b.replace(b"\n---\n", b"\n\n"))
    broken(
        "bad_event", "seed_instructions.md", lambda b: b + b"find a unicorn | collect_unicorn >=1\n"
    )
    broken(
        "bad_change",
        "transitions.md",
        lambda b: b + b"wood | *2 | doubled wood | double your wood\n",
    )
    broken("bad_field", "transitions.md", lambda b: b + b"mana | + | gained mana | gain mana\n")
    broken("seed_rule", "seed_instructions.md", lambda b: b + b"get much wood | wood >=7\n")
    broken("bad_truth", "eval_instructions.md", lambda b: b + b"count | have wood | wood\n")
    broken(
        "bad_columns", "eval_instructions.md", lambda b: b + b"plain | a row without its checker\n"
    )
    broken("bad_placeholder", "relabel.md", lambda b: b + b"\n${task}\n")
    broken("binary", "relabel.md", lambda b: bytes(range(128, 256)) * 4)
    broken("empty_prompt", "relabel.md", lambda b: b"")
    broken("no_evals", "eval_instructions.md", lambda b: b)
    (folder / "no_evals" / "oir" / "eval_instructions.md").unlink()
    broken("empty_body", "eval_instructions.md", lambda b: b.partition(b"\n---\n")[0] + b"\n---\n")
    broken("latin1", "seed_instructions.md", lambda b: b + "caf\u00e9 | wood +\n".encode("latin-1"))
    return out
