"""Benchmark (--num-seeds), end to end: what a user waits for. One process with `--num-seeds N` against N one-seed
processes run one after the other (the loop a user would otherwise write), each the real script from the command line:
imports, data loading, rules, compilation, training, the final evaluation. Wall time of both ways and their ratio
(sequential / one process: above 1 means --num-seeds saves time). bench_keystate_seeds.py measures the steady-state
update alone (parity on CPU); this one adds what a process pays once: start-up and compilation.

    python tests/support/keystate_data.py pointmaze /tmp/pm.npz --episodes 100 --episode-steps 1001 --seed 1
    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" taskset -c 0 \
        python tests/benchmarks/bench_keystate_seeds_e2e.py --dataset-path /tmp/pm.npz --json-out out.json
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(script, args, extra):
    cmd = [sys.executable, str(REPO / f"{script}.py"), *args, *extra]
    t = time.time()
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return time.time() - t


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scripts", nargs="+", default=["keystate_gciql", "keystate_hiql"])
    p.add_argument("--dataset-path", required=True)
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--total-steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden-dims", default="256 256 256")
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    out = {
        "seeds": a.seeds,
        "total_steps": a.total_steps,
        "batch_size": a.batch_size,
        "hidden_dims": a.hidden_dims,
    }
    for script in a.scripts:
        with tempfile.TemporaryDirectory() as tmp:
            common = [
                "--env-name", "pointmaze-medium-navigate-v0", "--dataset-path", a.dataset_path,
                "--rules-path", str(REPO / "prompts" / "keystate" / "rules_pointmaze_expert.json"),
                "--relabel", "keystate", "--batch-size", str(a.batch_size), "--hidden-dims", *a.hidden_dims.split(),
                "--total-steps", str(a.total_steps), "--log-interval", "100", "--eval-every", str(a.total_steps),
                "--eval-episodes", "1", "--run-dir", tmp,
            ]  # fmt: skip
            one = run(script, common, ["--num-seeds", str(a.seeds), "--seed", "0"])
            loop = sum(
                run(script, common, ["--num-seeds", "1", "--seed", str(s)]) for s in range(a.seeds)
            )
        out[script] = {"one_process_s": one, "sequential_processes_s": loop, "ratio": loop / one}
        print(
            f"{script}: {a.seeds} seeds x {a.total_steps} steps: one process {one:.0f} s, {a.seeds} processes one "
            f"after the other {loop:.0f} s: ratio {loop / one:.2f}x",
            flush=True,
        )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
