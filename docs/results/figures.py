"""Every figure in docs/results.md, drawn from the artifacts committed next to this file.

    python docs/results/figures.py collect-oir RUN_FOLDER ...   # TensorBoard events -> docs/results/oir_cpu.json
    python docs/results/figures.py draw                          # docs/results/* -> docs/img/*.png

Artifacts (docs/results/):
- keystate_cpu/<run folder>/td_probe.npz and final_eval.json: copied from each keystate_gciql.py run of results.md
  (the folder name is the run's: environment, learner, arm, data fraction, seeds).
- oir_cpu.json: the evaluation scalars of each oir_pqn.py run of results.md, read from its TensorBoard events by
  `collect-oir` (the events files themselves are not committed).
"""

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "img"
OIR_TAGS = [
    "eval/coverage",
    "eval/coverage_achievement",
    "eval/coverage_other",
    "eval/mean_success",
    "eval/reward_agreement_achievement",
    "eval/reward_agreement_other",
]
OIR_ARMS = {
    "pqn": "plain PQN (no relabeling)",
    "oir_template": "OIR, template relabeler",
    "oir_gt": "OIR, template + ground-truth reward",
}


def collect_oir(run_dirs, out: Path):
    """One record per run: its experiment name and seed (from the folder name) and each evaluation scalar by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    runs = []
    for d in map(Path, run_dirs):
        # Craftax-Classic-Symbolic-v1__{exp_name}__{seed}__{time}
        _, exp_name, seed, _ = d.name.split("__")
        ea = EventAccumulator(str(d), size_guidance={"scalars": 0})
        ea.Reload()
        scalars = {tag: {e.step: e.value for e in ea.Scalars(tag)} for tag in OIR_TAGS}
        steps = sorted(scalars["eval/coverage"])
        runs.append(
            dict(
                run=d.name,
                exp_name=exp_name,
                seed=int(seed),
                steps=steps,
                **{tag: [scalars[tag][s] for s in steps] for tag in OIR_TAGS},
            )
        )
    out.write_text(json.dumps(runs, indent=1))
    print(f"wrote {out}: {len(runs)} runs")


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
        ylabel="mean |TD| gap, 95% CI (> 0: key-state goals have larger TD errors)",
        title=run.name.rsplit("__", 1)[0],
    )
    plt.legend()
    # pointmaze-medium-navigate-v0__keystate_gciql__her__frac1__seed0x2__... -> keystate_td_probe_her_frac1.png
    arm, frac = re.search(r"__(her|keystate)__(frac[\d.]+)__", run.name).groups()
    out = IMG / f"keystate_td_probe_{arm}_{frac}.png"
    plt.savefig(out, dpi=80)
    plt.close()
    print(f"wrote {out}")


def draw_oir_coverage(runs: list):
    """Held-out coverage over training, per arm (mean of its seeds), achievement and other instructions apart."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    seeds = sorted({r["seed"] for r in runs})
    for ax, (group, total) in zip(axes, (("achievement", 38), ("other", 16))):
        for (exp_name, label), marker in zip(OIR_ARMS.items(), "osx"):
            arm = [r for r in runs if r["exp_name"] == exp_name]
            if arm:
                cov = np.mean([r[f"eval/coverage_{group}"] for r in arm], axis=0)
                ax.plot(arm[0]["steps"], cov, marker=marker, label=label)
        ax.set(
            title=f"{group} instructions (of {total})",
            xlabel="environment steps",
            ylabel=f"covered (success > 0.1), mean of {len(seeds)} seeds",
        )
    axes[0].legend(fontsize=8)
    fig.suptitle(
        "OIR-PQN on Craftax-Classic at CPU scale (64 envs, 2x128 network): held-out coverage"
    )
    fig.tight_layout()
    out = IMG / "oir_coverage_cpu.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    collect = sub.add_parser(
        "collect-oir", help="TensorBoard events of oir_pqn.py runs -> oir_cpu.json"
    )
    collect.add_argument("run_dirs", nargs="+")
    sub.add_parser("draw", help="every docs/img figure from the committed artifacts")
    args = parser.parse_args()
    if args.command == "collect-oir":
        collect_oir(args.run_dirs, HERE / "oir_cpu.json")
        return
    for run in sorted((HERE / "keystate_cpu").iterdir()):
        draw_td_probe(run)
    draw_oir_coverage(json.loads((HERE / "oir_cpu.json").read_text()))


if __name__ == "__main__":
    main()
