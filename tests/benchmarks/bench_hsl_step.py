"""One HSL step of hsl_sft.py timed on CPU with D' filled: rollout, relabel, optimise (Appendix F's split).

The paper (Appendix F; GPUs, Llama-3.2-1B agent, Llama-3.3-70B relabeler): 11.5 s rollout / 62.0 s relabel / 24.0 s
optimise per HSL step. Here, on one CPU thread: the tests' tiny random Llama (2 layers, hidden size 64, byte-level
tokenizer) as the agent; the 15 games of bench_hsl_oracle.py's NEW_ROOMS (rooms the tests never use) as the train
tasks; ALFWorld's hand-coded expert demonstrations as D_train; D' filled before the step with the oracle's relabels of
random play in those games (what earlier HSL steps would have put there); the paper's batch 32 (from D_train and from
D') and b = 18 rollouts; the oracle relabeler. The step itself is hsl_sft.py's own hsl_phase, run for one step, so
the times are the ones it logs (time/rollout, time/relabel, time/optimise).

    OMP_NUM_THREADS=1 taskset -c 0 python tests/benchmarks/bench_hsl_step.py --max-env-steps 10 \
        --out docs/results/hsl_step_cpu.json

--agent-max-new-tokens defaults to 64 here: the random model never writes an end of turn, so ETO's 512 would time
512-token turns that a trained agent (about 20-60 tokens a turn) does not write.
"""

import argparse
import collections
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "support"))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from alfworld_games import build_games  # noqa: E402
from bench_hsl_oracle import NEW_ROOMS, play  # noqa: E402
from conftest import build_tiny_lm  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--max-env-steps", type=int, default=10, help="T of the timed rollouts (the paper: 40)"
    )
    p.add_argument("--agent-max-new-tokens", type=int, default=64)
    p.add_argument(
        "--random-episodes", type=int, default=3, help="random-play episodes per game that fill D'"
    )
    p.add_argument("--out", default=None, help="write the times and sizes as JSON here")
    a = p.parse_args()
    import numpy as np
    import torch
    from accelerate import Accelerator

    torch.set_num_threads(1)
    spec = importlib.util.spec_from_file_location("hsl_sft", HERE.parents[1] / "hsl_sft.py")
    hsl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hsl)
    tmp = Path(tempfile.mkdtemp())
    root = build_games(
        tmp / "games",
        {"train": NEW_ROOMS, "valid_seen": NEW_ROOMS[:1], "valid_unseen": NEW_ROOMS[:1]},
    )
    args = hsl.Args(
        data_dir=str(root),
        model_name=str(build_tiny_lm(tmp / "tiny")),
        relabeler="oracle",
        num_demos=len(NEW_ROOMS),
        batch_size=32,
        micro_batch_size=4,
        hsl_steps=1,
        rollouts_per_step=18,
        max_env_steps=a.max_env_steps,
        agent_max_new_tokens=a.agent_max_new_tokens,
        eval_every=0,
        seed=42,
    )
    accelerator = Accelerator(cpu=True)
    rng = np.random.default_rng(args.seed + 10_000)
    state = {"sft_steps": 0, "hsl_steps": 0, "evaluations": 0, "counters": {}}
    prompts, train_games, eval_games, prefix, demos, client = hsl.load_inputs(args)
    model, optimizer, agent, encoded, buffer, batches, saved_sched = hsl.load_learner(
        args, prefix, demos, state, rng, accelerator, print
    )
    counts = collections.Counter()
    play_rng = random.Random(0)
    for g in train_games:
        for _ in range(a.random_episodes):
            traj, _ = play(hsl, g, play_rng, 40)
            buffer.push_all(hsl.relabel([traj], args, counts), counts)
    print(f"D' filled with {len(buffer)} oracle relabels of random play ({dict(counts)})")
    logged = []

    def log(info, step):
        logged.append(info)

    def save(*_):
        pass

    hsl.hsl_phase(
        model,
        optimizer,
        agent,
        encoded,
        batches,
        saved_sched,
        buffer,
        train_games,
        eval_games,
        client,
        prompts,
        rng,
        state,
        args,
        accelerator,
        log,
        print,
        save,
    )
    info = logged[-1]
    report = dict(
        agent="tiny random Llama (2 layers, hidden 64, byte-level tokenizer), float32, 1 CPU thread",
        T=args.max_env_steps,
        b=args.rollouts_per_step,
        batch_size=args.batch_size,
        agent_max_new_tokens=args.agent_max_new_tokens,
        d_train=len(encoded),
        d_prime=len(buffer),
        d_train_tokens_per_demo=float(np.mean([len(e["input_ids"]) for e in encoded])),
        paper_seconds=dict(rollout=11.5, relabel=62.0, optimise=24.0),
        seconds={k: round(info[f"time/{k}"], 1) for k in ("rollout", "relabel", "optimise")},
        losses={k: info[k] for k in ("sft/loss", "hsl/loss", "losses/hsl_total") if k in info},
        rollout_success=info["charts/rollout_success"],
        invalid_action_rate=info["charts/invalid_action_rate"],
    )
    print(json.dumps(report, indent=1))
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
