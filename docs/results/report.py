"""Every figure and table in docs/results.md, from the artifacts committed next to this file.

    python docs/results/report.py collect RUN_FOLDER ...   # a run's artifacts -> docs/results/
    python docs/results/report.py figures                   # docs/results/* -> docs/img/*.png
    python docs/results/report.py tables                    # docs/results/* -> the tables of docs/results.md

Artifacts (docs/results/), written by `collect` from the run folders of the commands in docs/results.md:
- keystate_cpu/<run folder>/: td_probe.npz and final_eval.json as keystate_gciql.py wrote them, and scalars.json
  (p_keystate and evaluation success per seed and the matched TD gap, by step, from the run's TensorBoard events). The folder name is
  the run's: environment, learner, arm, data fraction, seeds.
- oir_1m_cpu.json, oir_opposites.json, oir_reward_rule_sweep.json: written by the scripts under tests/benchmarks/ named
  in docs/results.md (the OIR tables are printed by tests/benchmarks/oir_experiment.py, called from `tables`).
The TensorBoard events files themselves are not committed.
"""

import argparse
import json
import shutil
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

HERE = Path(__file__).resolve().parent
IMG = HERE.parent / "img"
KEYSTATE = HERE / "keystate_cpu"
EVAL_EPISODES = 10  # --eval-episodes of the key-state runs (per task and seed)


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
    for run in map(Path, run_dirs):
        out = KEYSTATE / run.name
        out.mkdir(parents=True, exist_ok=True)
        for name in ("td_probe.npz", "final_eval.json"):
            shutil.copy(run / name, out / name)
        seeds = json.loads((run / "final_eval.json").read_text())["seeds"]
        tags = (
            [f"relabel/p_keystate/seed{s}" for s in seeds]
            + [f"eval/overall_success/seed{s}" for s in seeds]
            + ["relabel/td_gap_key_minus_matched"]
        )
        (out / "scalars.json").write_text(json.dumps(scalars(run, tags), indent=1))
        print(f"collected {out}")


def wilson(k: int, n: int, z: float = 1.96):
    """Wilson score interval of a proportion k/n."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


ARMS = {  # (exp name after keystate_<learner>, --relabel) in the run folder's name -> the arm
    ("", "her"): "HER",
    ("_fixed", "keystate"): "key-state, p 0.5 fixed",
    ("", "keystate"): "key-state, self-check",
}
LEARNERS = ("gciql", "hiql")


def arm_and_fraction(run: Path):
    """pointmaze-medium-navigate-v0__keystate_gciql_fixed__keystate__frac0.5__seed0x4__... ->
    ("gciql", "key-state, p 0.5 fixed", "0.5")."""
    _, exp_name, relabel, frac, _ = run.name.split("__", 4)
    learner, _, suffix = exp_name.removeprefix("keystate_").partition("_")
    return learner, ARMS["_" + suffix if suffix else "", relabel], frac.removeprefix("frac")


def keystate_runs(learner: str):
    """{(arm, fraction): run folder} of one learner, in the table's order."""
    runs = {}
    for run in KEYSTATE.iterdir():
        run_learner, arm, frac = arm_and_fraction(run)
        if run_learner == learner:
            runs[arm, frac] = run
    return {
        (arm, frac): runs[arm, frac]
        for frac in sorted({f for _, f in runs}, key=lambda f: -float(f))
        for arm in ARMS.values()
        if (arm, frac) in runs
    }


def clustered_gap(td, counts, kind: int, rng, n_boot: int = 1000):
    """Mean paired |TD| gap key-state - kind over the counting rows of all seeds, and its 95% CI from a
    bootstrap clustered by seed (resample seeds, then rows within each resampled seed).
    td: (seeds, 4, rows), counts: (seeds, rows)."""
    gaps = [(t[0] - t[kind])[c] for t, c in zip(td, counts)]
    boots = []
    for _ in range(n_boot):
        picked = [gaps[i] for i in rng.integers(len(gaps), size=len(gaps))]
        boots.append(np.concatenate([g[rng.integers(len(g), size=len(g))] for g in picked]).mean())
    return np.concatenate(gaps).mean(), np.percentile(boots, [2.5, 97.5])


def successes(run: Path):
    """Per seed: successful episodes at the last evaluation, and the episodes (5 tasks x --eval-episodes)."""
    final = json.loads((run / "final_eval.json").read_text())
    episodes = 5 * EVAL_EPISODES
    return [round(r["eval/overall_success"] * episodes) for r in final["per_seed"]], episodes


def draw_keystate(runs: dict, learner: str):
    """Figure 2 with the distance-matched comparator (key-state - matched |TD| gap over training, clustered CIs), and
    p_keystate of the self-check arm per seed over training."""
    rng = np.random.default_rng(0)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    fracs = sorted({f for _, f in runs}, key=lambda f: -float(f))
    for ax, frac in zip(axes, fracs):
        for (arm, f), run in runs.items():
            if f != frac:
                continue
            with np.load(run / "td_probe.npz") as z:
                steps, td, counts = z["steps"], z["td"], z["counts"]
            stats = [clustered_gap(td[i], counts[i], 1, rng, 300) for i in range(len(steps))]
            mean = np.array([m for m, _ in stats])
            ci = np.array([c for _, c in stats])
            ax.errorbar(steps, mean, yerr=np.abs(ci.T - mean), marker="o", capsize=3, label=arm)
        ax.axhline(0, color="gray")  # the finding is the sign of the gap
        ax.set(
            title=f"{float(frac):.0%} data: key-state - matched |TD| gap",
            xlabel="gradient step",
            ylabel="gap, 95% CI by seed clusters\n(> 0: key states harder)",
        )
        ax.legend(fontsize=8)
    for (arm, frac), run in runs.items():
        if arm != "key-state, self-check":
            continue
        s = json.loads((run / "scalars.json").read_text())
        for tag in sorted(t for t in s if t.startswith("relabel/p_keystate/")):
            steps = sorted(s[tag], key=int)
            axes[2].plot(
                [int(k) for k in steps],
                [s[tag][k] for k in steps],
                linestyle="-" if frac == "1" else "--",
                label=f"{float(frac):.0%} data, {tag.rsplit('/', 1)[1]}",
            )
    axes[2].set(
        title="self-check arm: p_keystate per seed", xlabel="gradient step", ylabel="p_keystate"
    )
    axes[2].legend(fontsize=7, ncol=2)
    fig.suptitle(
        f"keystate_{learner}, pointmaze-medium-navigate (100 x 1,001 rows, built offline), 4 seeds, 2x128, batch 256: "
        "CPU scale"
    )
    fig.tight_layout()
    out = IMG / f"keystate_matched_gap_cpu{'' if learner == 'gciql' else '_' + learner}.png"
    fig.savefig(out, dpi=80)
    plt.close(fig)
    print(f"wrote {out}")


def keystate_table(learner: str):
    runs = keystate_runs(learner)
    if not runs:
        return
    print(f"keystate_{learner}\n")
    rng = np.random.default_rng(0)
    print(
        "| arm | data | successes at the end (of episodes) [95% Wilson] | per seed | arm - HER per seed "
        "| mean of the paired differences [95% bootstrap over seeds] |"
    )
    print("|---|---|---|---|---|---|")
    for (arm, frac), run in runs.items():
        per_seed, episodes = successes(run)
        k = sum(per_seed)
        n = episodes * len(per_seed)
        lo, hi = wilson(k, n)
        diff = mean_ci = "-"
        if arm != "HER":
            d = np.array(per_seed) - np.array(successes(runs["HER", frac])[0])
            diff = ", ".join(f"{x:+d}" for x in d)
            boot = [d[rng.integers(len(d), size=len(d))].mean() for _ in range(10_000)]
            lo_d, hi_d = np.percentile(boot, [2.5, 97.5])
            mean_ci = f"{d.mean():+.2f} [{lo_d:+.2f}, {hi_d:+.2f}]"
        print(
            f"| {arm} | {float(frac):.0%} | {k}/{n} [{lo:.2f}, {hi:.2f}] | {per_seed} (of {episodes}) "
            f"| {diff} | {mean_ci} |"
        )
    print()
    print(
        "| arm | data | key - matched at each probe [95% CI clustered by seed] | key - HER (last) "
        "| key - uniform (last) | distance key / matched / HER / uniform (last) | p_keystate per seed, first log "
        "/ last |"
    )
    print("|---|---|---|---|---|---|---|")
    for (arm, frac), run in runs.items():
        with np.load(run / "td_probe.npz") as z:
            steps, td, dist, counts = z["steps"], z["td"], z["dist"], z["counts"]
        cells = []
        for kinds, snapshots in (((1,), range(len(steps))), ((2, 3), [-1])):
            for kind in kinds:
                parts = []
                for i in snapshots:
                    m, c = clustered_gap(td[i], counts[i], kind, rng)
                    parts.append(f"{m:+.3f} [{c[0]:+.3f}, {c[1]:+.3f}]")
                cells.append(" / ".join(parts))
        last = counts[-1]
        distance = " / ".join(f"{dist[-1][:, j][last].mean():.0f}" for j in range(4))
        s = json.loads((run / "scalars.json").read_text())
        p = [s[t] for t in sorted(t for t in s if t.startswith("relabel/p_keystate/"))]
        p_text = ", ".join(f"{q[min(q, key=int)]:.2f} / {q[max(q, key=int)]:.2f}" for q in p)
        print(
            f"| {arm} | {float(frac):.0%} | {cells[0]} (at {', '.join(f'{x // 1000}k' for x in steps)}) "
            f"| {cells[1]} | {cells[2]} | {distance} | {p_text} |"
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
        for learner in LEARNERS:
            if keystate_runs(learner):
                draw_keystate(keystate_runs(learner), learner)
    else:
        for learner in LEARNERS:
            keystate_table(learner)
            print()
        # the OIR experiment's tables (its artifact is collected from the runs' logs by the same script)
        sys.path.insert(0, str(HERE.parents[1] / "tests" / "benchmarks"))
        import oir_experiment

        oir_experiment.table(HERE / "oir_1m_cpu.json")


if __name__ == "__main__":
    main()
