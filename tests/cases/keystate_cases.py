"""Bad inputs for keystate_gciql.py / keystate_hiql.py: what a careless or hostile user passes, and the one line each
must end in. BAD_INPUTS maps a case name to (flags, exit status, regex the single `error:` line must match): exit
status 2 is a usage error, 1 a data error. "{NAME}" in a flag is a file from `write_bad_inputs`; every case starts from
a valid command line (pointmaze dataset, rules file, --run-dir) and its flags come last (the last one wins).
HIQL_BAD_INPUTS: the HIQL-only flags (keystate_hiql.py only)."""

from pathlib import Path

import numpy as np

BAD_INPUTS = {
    "batch-size-0": (["--batch-size", "0"], 2, r"--batch-size: must be in \[1, 65536\], got 0"),
    "batch-size-negative": (
        ["--batch-size", "-1"],
        2,
        r"--batch-size: must be in \[1, 65536\], got -1",
    ),
    "total-steps-0": (["--total-steps", "0"], 2, r"--total-steps: must be in \[1, 1000000000\]"),
    "dataset-fraction-0": (
        ["--dataset-fraction", "0"],
        2,
        r"--dataset-fraction: must be in \[0.001, 1.0\]",
    ),
    "dataset-fraction-above-1": (
        ["--dataset-fraction", "1.5"],
        2,
        r"--dataset-fraction: must be in \[0.001, 1.0\]",
    ),
    "eval-every-negative": (["--eval-every", "-1"], 2, r"--eval-every: must be in \[0, "),
    "log-interval-0": (["--log-interval", "0"], 2, r"--log-interval: must be in \[1, "),
    "p-keystate-above-1": (["--p-keystate", "1.5"], 2, r"--p-keystate: must be in \[0.0, 1.0\]"),
    "keystate-window-0": (["--keystate-window", "0"], 2, r"--keystate-window: must be in \[1, "),
    "hidden-dims-0": (["--hidden-dims", "0"], 2, r"--hidden-dims: must be in \[1, 16384\]"),
    "num-rules-above-cap": (["--num-rules", "17"], 2, r"--num-rules: must be in \[1, 16\]"),
    # paths are checked where they are read: a data error
    "dataset-path-missing": (["--dataset-path", "{missing}"], 1, r"missing\.npz: cannot read"),
    "rules-path-missing": (["--rules-path", "{missing}"], 1, r"missing\.npz: .*No such file"),
    "run-dir-is-a-file": (
        ["--run-dir", "{text_npz}"],
        1,
        r"--run-dir: cannot create the run folder .*File exists",
    ),
    "run-dir-under-proc": (
        ["--run-dir", "/proc/no_such_process/runs"],
        1,
        r"--run-dir: cannot create the run folder",
    ),
    "unknown-env": (
        ["--env-name", "nosuchmaze-large-navigate-v0"],
        2,
        r"--env-name: unknown OGBench environment",
    ),
    "npz-corrupt-member": (
        ["--dataset-path", "{corrupt_npz}"],
        1,
        r"corrupt\.npz: cannot read .*CRC",
    ),
    "npz-object-dtype": (
        ["--dataset-path", "{object_npz}"],
        1,
        r"object\.npz: cannot read .*allow_pickle",
    ),
    "npy-renamed-npz": (["--dataset-path", "{npy_npz}"], 1, r"npy\.npz: cannot read observations"),
    "npz-missing-keys": (
        ["--dataset-path", "{nokeys_npz}"],
        1,
        r"nokeys\.npz: cannot read .*observations",
    ),
    "text-renamed-npz": (["--dataset-path", "{text_npz}"], 1, r"text\.npz: cannot read .*pickled"),
    "npz-wrong-shape": (
        ["--dataset-path", "{shape_npz}"],
        1,
        r"shape\.npz: observations, actions, terminals have",
    ),
    "npz-nan": (
        ["--dataset-path", "{nan_npz}"],
        1,
        r"nan\.npz: observations, actions or terminals hold NaN",
    ),
    "npz-nan-terminals": (
        ["--dataset-path", "{nanterm_npz}"],
        1,
        r"nanterm\.npz: observations, actions or terminals hold NaN",
    ),
    "npz-last-row-not-terminal": (
        ["--dataset-path", "{open_npz}"],
        1,
        r"open\.npz: the last row is not terminal",
    ),
    "npz-every-row-terminal": (
        ["--dataset-path", "{allterm_npz}"],
        1,
        r"allterm\.npz: every row is terminal",
    ),
    "rules-not-json": (
        ["--rules-path", "{text_rules}"],
        1,
        r"text_rules\.json: no JSON object with a 'rules' list",
    ),
    "rules-binary": (["--rules-path", "{binary_rules}"], 1, r"binary_rules\.json: .*can't decode"),
}

HIQL_BAD_INPUTS = {
    "subgoal-steps-0": (["--subgoal-steps", "0"], 2, r"--subgoal-steps: must be in \[1, 16384\]")
}


def write_bad_inputs(folder: Path) -> dict:
    """The files BAD_INPUTS names, for pointmaze (2-d observations and actions); returns {NAME: path}."""
    folder.mkdir(parents=True, exist_ok=True)
    n, term = 100, np.zeros(100, bool)
    term[49::50] = True
    good = dict(
        observations=np.ones((n, 2), np.float32),
        actions=np.zeros((n, 2), np.float32),
        terminals=term,
    )
    files = {"missing": folder / "missing.npz"}
    for name, arrays in {
        "corrupt_npz": good,
        "object_npz": {**good, "observations": good["observations"].astype(object)},
        "nokeys_npz": {"obs": good["observations"], "actions": good["actions"], "terminals": term},
        "shape_npz": {**good, "observations": np.ones((n, 3), np.float32)},
        "nan_npz": {**good, "observations": np.full((n, 2), np.nan, np.float32)},
        "nanterm_npz": {**good, "terminals": np.where(term, 1.0, np.nan)},
        "open_npz": {**good, "terminals": np.zeros(n, bool)},
        "allterm_npz": {**good, "terminals": np.ones(n, bool)},
    }.items():
        files[name] = folder / (name.removesuffix("_npz") + ".npz")
        np.savez(
            files[name], **arrays
        )  # uncompressed, allow_pickle on save: the object array is stored as a pickle
    raw = bytearray(
        files["corrupt_npz"].read_bytes()
    )  # flip bytes inside the first member's data: a bad CRC-32
    start = raw.index(b"\x93NUMPY") + 200
    raw[start : start + 16] = bytes(16)
    files["corrupt_npz"].write_bytes(bytes(raw))
    np.save(folder / "npy.npy", good["observations"])
    files["npy_npz"] = (folder / "npy.npy").rename(folder / "npy.npz")
    files["text_npz"] = folder / "text.npz"
    files["text_npz"].write_text("observations,actions,terminals\n0,0,1\n")
    files["text_rules"] = folder / "text_rules.json"
    files["text_rules"].write_text("{'rules': [ this is not json")
    files["binary_rules"] = folder / "binary_rules.json"
    files["binary_rules"].write_bytes(bytes(range(128, 256)) * 4)
    return files
