"""Every figure and table in docs/results.md, from the artifacts committed next to this file.

    python docs/results/report.py collect RUN_FOLDER ...   # a run's artifacts -> docs/results/
    python docs/results/report.py figures                   # docs/results/* -> docs/img/*.png
    python docs/results/report.py tables                    # docs/results/* -> the tables of docs/results.md

Artifacts (docs/results/), written by `collect` from the run folders of the commands in docs/results.md:
- keystate_cpu/<run folder>/: td_probe.npz and final_eval.json as keystate_gciql.py wrote them, and scalars.json
  (p_keystate and evaluation success per seed, by step, read from the run's TensorBoard events). The folder name is
  the run's: environment, learner, arm, data fraction, seeds.
- oir_cpu.json: the evaluation scalars of each oir_pqn.py run, by step, read from its TensorBoard events.
The TensorBoard events files themselves are not committed.
"""

import argparse
import json
import re
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "img"
KEYSTATE = HERE / "keystate_cpu"
OIR = HERE / "oir_cpu.json"
OIR_TAGS = [
    "eval/coverage",
    "eval/coverage_achievement",
    "eval/coverage_other",
    "eval/mean_success",
    "eval/reward_agreement_achievement",
    "eval/reward_agreement_other",
]
OIR_ARMS = {
    "pqn": "plain PQN",
    "oir_template": "OIR, template relabeler",
    "oir_gt": "OIR, template, ground-truth reward",
}


def scalars(run: Path, tags) -> dict:
    """{tag: {step: value}} from a run folder's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run), size_guidance={"scalars": 0})
    ea.Reload()
    return {
        tag: {e.step: e.value for e in ea.Scalars(tag)}
        for tag in tags
        if tag in ea.Tags()["scalars"]
    }


def collect(run_dirs):
    oir = json.loads(OIR.read_text()) if OIR.exists() else []
    for run in map(Path, run_dirs):
        if run.name.startswith(
            "Craftax"
        ):  # Craftax-Classic-Symbolic-v1__{exp_name}__{seed}__{time}
            _, exp_name, seed, _ = run.name.split("__")
            s = scalars(run, OIR_TAGS)
            steps = sorted(s["eval/coverage"])
            oir = [r for r in oir if r["run"] != run.name]
            oir.append(
                dict(run=run.name, exp_name=exp_name, seed=int(seed), steps=steps)
                | {tag: [s[tag][k] for k in steps] for tag in OIR_TAGS}
            )
            continue
        out = KEYSTATE / run.name
        out.mkdir(parents=True, exist_ok=True)
        for name in ("td_probe.npz", "final_eval.json"):
            shutil.copy(run / name, out / name)
        seeds = json.loads((run / "final_eval.json").read_text())["seeds"]
        tags = [f"relabel/p_keystate/seed{s}" for s in seeds] + [
            f"eval/overall_success/seed{s}" for s in seeds
        ]
        (out / "scalars.json").write_text(json.dumps(scalars(run, tags), indent=1))
        print(f"collected {out}")
    oir.sort(key=lambda r: (list(OIR_ARMS).index(r["exp_name"]), r["seed"]))
    OIR.write_text(json.dumps(oir, indent=1))
    print(f"collected {OIR}: {len(oir)} runs")


def arm_and_fraction(run: Path):
    """pointmaze-medium-navigate-v0__keystate_gciql__her__frac1__seed0x2__... -> ("her", "1")."""
    return re.search(r"__(her|keystate)__frac([\d.]+)__", run.name).groups()


def draw_td_probe(run: Path):
    """Figure 2 of the key-state paper from one run's td_probe.npz, as keystate_gciql.py draws it."""
    with np.load(run / "td_probe.npz") as f:
        steps = f["steps"]
        for kind in ("her", "uniform"):
            mean = f[f"gap_{kind}_mean"]
            ci = f[f"gap_{kind}_ci"]
            plt.errorbar(
                steps, mean, yerr=np.abs(ci.T - mean), marker="o", label=f"key-state - {kind}"
            )
    plt.axhline(0, color="gray")  # the finding is the sign of the gap
    plt.gca().set(
        xlabel="gradient step",
        ylabel="|TD| gap, 95% CI (> 0: key-state goals are harder)",
        title=run.name.rsplit("__", 1)[0],
    )
    plt.legend()
    arm, frac = arm_and_fraction(run)
    out = IMG / f"keystate_td_probe_{arm}_frac{frac}.png"
    plt.savefig(out, bbox_inches="tight")
    plt.close()
    print(f"wrote {out}")


def draw_oir_coverage(runs: list):
    """Held-out coverage over training, per arm (mean of its seeds), achievement and other instructions apart."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = sorted({r["seed"] for r in runs})
    for ax, (group, total) in zip(axes, (("achievement", 38), ("other", 16))):
        for (exp_name, label), marker in zip(OIR_ARMS.items(), "osx"):
            arm = [r for r in runs if r["exp_name"] == exp_name]
            cov = np.mean([r[f"eval/coverage_{group}"] for r in arm], axis=0)
            ax.plot(arm[0]["steps"], cov, marker=marker, label=label)
        ax.set(
            title=f"{group} instructions (of {total})",
            xlabel="environment steps",
            ylabel=f"covered (success > 0.1), mean of {len(seeds)} seeds",
        )
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "OIR-PQN on Craftax-Classic-Symbolic at CPU scale (64 envs, 2x128 network): held-out coverage"
    )
    fig.tight_layout()
    out = IMG / "oir_coverage_cpu.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out}")


def wilson(k: int, n: int, z: float = 1.96):
    """Wilson score interval of a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def keystate_table():
    runs = sorted(
        KEYSTATE.iterdir(), key=lambda r: (-float(arm_and_fraction(r)[1]), arm_and_fraction(r)[0])
    )
    successes = {}
    print(
        "| arm | data | successes @3k (of episodes) [95% Wilson] | per seed | keystate - HER per seed "
        "| TD gap key - HER (1k / 2k / 3k) | TD gap key - uniform (1k / 2k / 3k) | distance key / HER / uniform "
        "| p_keystate per seed @1k / @3k |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for run in runs:
        arm, frac = arm_and_fraction(run)
        final = json.loads((run / "final_eval.json").read_text())
        # --eval-episodes 3 per task, 5 tasks: overall success x 15 episodes per seed
        per_seed = [round(r["eval/overall_success"] * 15) for r in final["per_seed"]]
        successes[arm, frac] = per_seed
        k = sum(per_seed)
        n = 15 * len(per_seed)
        lo, hi = wilson(k, n)
        diff = ""
        if arm == "keystate":
            diff = ", ".join(f"{a - b:+d}" for a, b in zip(per_seed, successes["her", frac]))
        with np.load(run / "td_probe.npz") as f:
            gaps = [
                " / ".join(
                    f"{m:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]"
                    for m, c in zip(f[f"gap_{kind}_mean"], f[f"gap_{kind}_ci"])
                )
                for kind in ("her", "uniform")
            ]
            dist = " / ".join(f"{d:.0f}" for d in f["dist_mean"][-1])
        s = json.loads((run / "scalars.json").read_text())
        p = [s[f"relabel/p_keystate/seed{seed}"] for seed in final["seeds"]]
        p_text = ", ".join(f"{q['1000']:.2f} / {q['3000']:.2f}" for q in p)
        print(
            f"| {arm} | {float(frac):.0%} | {k}/{n} [{lo:.2f}, {hi:.2f}] | {per_seed} | {diff or '-'} | {gaps[0]} "
            f"| {gaps[1]} | {dist} | {p_text} |"
        )


def oir_table():
    print(
        "| arm | seed | coverage at each evaluation: all (achievement + other) | mean success (last) "
        "| reward agreement (last), achievement / other |"
    )
    print("|---|---|---|---|---|")
    for r in json.loads(OIR.read_text()):
        cov = " / ".join(
            f"{a + o:.0f} ({a:.0f}+{o:.0f})"
            for a, o in zip(r["eval/coverage_achievement"], r["eval/coverage_other"])
        )
        steps = " / ".join(f"{s // 1000}k" for s in r["steps"])
        agree = f"{r['eval/reward_agreement_achievement'][-1]:.2f} / {r['eval/reward_agreement_other'][-1]:.2f}"
        print(
            f"| {OIR_ARMS[r['exp_name']]} | {r['seed']} | {cov} (at {steps}) | {r['eval/mean_success'][-1]:.3f} | {agree} |"
        )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser(
        "collect", help="copy or extract a run's artifacts into docs/results/"
    ).add_argument("run_dirs", nargs="+")
    sub.add_parser("figures", help="every docs/img figure of docs/results.md from the artifacts")
    sub.add_parser("tables", help="the tables of docs/results.md from the artifacts")
    args = parser.parse_args()
    if args.command == "collect":
        collect(args.run_dirs)
    elif args.command == "figures":
        for run in sorted(KEYSTATE.iterdir()):
            draw_td_probe(run)
        draw_oir_coverage(json.loads(OIR.read_text()))
    else:
        keystate_table()
        print()
        oir_table()


if __name__ == "__main__":
    main()
