"""The OIR experiment at CPU scale (docs/results.md): collect the final evaluations of its runs and print the table.

Arms (3 seeds each, 1,048,576 environment steps, 64 envs x 8 steps, 2x128 network, single-threaded XLA, one core per
run): plain PQN on the seed instructions with the ground-truth reward (`--relabel none --reward gt`); OIR with the
template relabeler (`--relabel template`); OIR with the paraphrasing relabeler (`--relabel template --prompts-dir` a
folder written by oir_paraphrase/make_prompts.py); the two OIR arms again with `--reward gt`. Each is evaluated once at
the end on the 54 held-out instructions x 16 episodes of at most 150 steps; the random-policy floor is
oir_reward_agreement.py with the same episodes and steps. This script reads the runs' printed evaluations (stdout
logs) and writes one JSON artifact; `table` prints per-seed results, paired differences against plain PQN per seed
(3 seeds: no t-interval) and pooled success with a Wilson interval (episodes pooled over instructions and seeds, so it
understates the spread between seeds; read it with the per-seed columns).

    python tests/benchmarks/oir_experiment.py collect /tmp/oir1m/*.log --out docs/results/oir_1m_cpu.json
    python tests/benchmarks/oir_experiment.py table docs/results/oir_1m_cpu.json
"""

import argparse
import json
import math
import re
from pathlib import Path

ARMS = {
    "random": "random policy (floor)",
    "pqn_gt": "plain PQN, seed instructions, gt reward",
    "template": "OIR, template relabeler",
    "template_gt": "OIR, template relabeler, --reward gt",
    "paraphrase": "OIR, paraphrasing relabeler",
    "paraphrase_gt": "OIR, paraphrasing relabeler, --reward gt",
    # PQN departures (docs/oir_pqn.md): the reference's layout, 512 envs x 1 step, 1 minibatch (1-step targets)
    "pqn_gt_ref": "plain PQN, reference layout (512 envs x 1 step, 1 minibatch)",
    "template_ref": "OIR template relabeler, reference layout",
}
EPISODES = 16
KIND_LINE = re.compile(
    r"^  (\w+): coverage (\d+)/(\d+); semantic reward vs ground truth over (\d+) episodes: precision (\S+), "
    r"recall (\S+), kappa (\S+) \(semantic (\d+), truth (\d+), both (\d+)\)",
    re.M,
)


def parse(log: Path) -> dict:
    out = log.read_text()
    if "eval coverage" not in out:
        raise SystemExit(f"{log}: no evaluation printed")
    # one evaluation per run (--eval-every 0): every printed instruction line is the final evaluation's
    rows = re.findall(r"^  eval success\s+([\d.]+)\s+\[(\w+)\] (.+)$", out, re.M)
    kinds = {
        k: dict(
            zip(
                (
                    "coverage",
                    "n",
                    "episodes",
                    "precision",
                    "recall",
                    "kappa",
                    "semantic",
                    "truth",
                    "both",
                ),
                [int(c), int(n), int(e), float(p), float(r), float(kp), int(s), int(t), int(b)],
            )
        )
        for k, c, n, e, p, r, kp, s, t, b in KIND_LINE.findall(out[out.rindex("eval coverage") :])
    }
    m = re.search(r"done: .*; counts: (\{.*\})", out)
    return {
        "success": {text: round(float(rate) * EPISODES) for rate, _, text in rows},
        "kind": {text: kind for _, kind, text in rows},
        "per_kind": kinds,
        "relabel_counts": m.group(1) if m else None,
    }


def wilson(k: int, n: int, z: float = 1.96):
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def collect(logs, out):
    runs = []
    for log in logs:
        name = Path(log).stem
        arm, _, seed = name.rpartition("_")
        if name == "random_floor":
            arm, seed = "random", "0"
        if arm not in ARMS:
            continue
        runs.append({"arm": arm, "seed": int(seed), "log": Path(log).name, **parse(Path(log))})
    runs.sort(key=lambda r: (list(ARMS).index(r["arm"]), r["seed"]))
    Path(out).write_text(json.dumps(runs, indent=1))
    print(f"wrote {out}: {len(runs)} runs")


def table(path):
    runs = json.loads(Path(path).read_text())
    # instructions every run was evaluated on (the evaluation set grew by 4 negations during the experiment)
    common = set.intersection(*(set(r["success"]) for r in runs))
    for r in runs:
        r["success"] = {t: v for t, v in r["success"].items() if t in common}
    print(f"{len(common)} instructions evaluated in every run")
    kinds = sorted({r["kind"][t] for r in runs for t in common})
    base = {r["seed"]: r for r in runs if r["arm"] == "pqn_gt"}
    # (arm, label, its runs) for every arm that has runs, in ARMS order
    arms = [(arm, label, [r for r in runs if r["arm"] == arm]) for arm, label in ARMS.items()]
    arms = [(arm, label, rs) for arm, label, rs in arms if rs]
    print(
        "| arm | seeds | episodes succeeded, pooled (Wilson 95%) | per seed: successes of 864 "
        "| per seed: covered of 54 | minus plain PQN, per seed (successes) |"
    )
    print("|---|---|---|---|---|---|")
    for arm, label, rs in arms:
        per_seed = [sum(r["success"].values()) for r in rs]
        cov = [sum(v / EPISODES > 0.1 for v in r["success"].values()) for r in rs]
        n = len(rs) * len(common) * EPISODES
        lo, hi = wilson(sum(per_seed), n)
        diff = (
            ", ".join(
                f"{s - sum(base[r['seed']]['success'].values()):+d}" for r, s in zip(rs, per_seed)
            )
            if arm not in ("random", "pqn_gt")
            else "-"
        )
        print(
            f"| {label} | {len(rs)} | {sum(per_seed)}/{n} = {sum(per_seed) / n:.3f} [{lo:.3f}, {hi:.3f}] "
            f"| {', '.join(map(str, per_seed))} | {', '.join(map(str, cov))} | {diff} |"
        )
    print()
    print("| arm | " + " | ".join(f"{k} success (pooled)" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for _, label, rs in arms:
        cells = []
        for k in kinds:
            texts = [t for t, kk in rs[0]["kind"].items() if kk == k]
            s = sum(r["success"][t] for r in rs for t in texts)
            cells.append(f"{s / (len(rs) * len(texts) * EPISODES):.3f}")
        print(f"| {label} | " + " | ".join(cells) + " |")
    print()
    print("| arm | " + " | ".join(f"{k} P / R / k" for k in kinds) + " |")
    print("|---|" + "---|" * len(kinds))
    for _, label, rs in arms:
        cells = []
        for k in kinds:  # pooled over seeds from the episode counts
            sem = sum(r["per_kind"][k]["semantic"] for r in rs)
            tru = sum(r["per_kind"][k]["truth"] for r in rs)
            both = sum(r["per_kind"][k]["both"] for r in rs)
            n = sum(r["per_kind"][k]["episodes"] for r in rs)
            ps, pt = sem / n, tru / n
            chance = ps * pt + (1 - ps) * (1 - pt)
            agree = (n - sem - tru + 2 * both) / n
            kappa = (agree - chance) / (1 - chance) if chance < 1 else float("nan")
            p = both / sem if sem else float("nan")
            r_ = both / tru if tru else float("nan")
            cells.append(f"{p:.2f} / {r_:.2f} / {kappa:.2f}")
        print(f"| {label} | " + " | ".join(cells) + " |")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("collect")
    c.add_argument("logs", nargs="+")
    c.add_argument("--out", required=True)
    t = sub.add_parser("table")
    t.add_argument("json")
    a = p.parse_args()
    if a.cmd == "collect":
        collect(a.logs, a.out)
    else:
        table(a.json)


if __name__ == "__main__":
    main()
