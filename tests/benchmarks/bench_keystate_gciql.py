"""Benchmark: gradient steps per second of keystate_gciql.py's jitted update vs OGBench's reference GCIQL.

Same dataset, batch 1024, 3x512 MLPs, one process, rounds interleaved (ours, reference, ours, ...) so that load from
other processes hits both alike. Both sides include their batch sampling: ours samples on device inside the jitted
update (key-state relabeling on, and the HER arm too); the reference samples with NumPy (GCDataset.sample) and then
calls its jitted GCIQLAgent.update, exactly as its main.py loop does.

The reference is not vendored. Fetch it and point OGBENCH_IMPLS at its impls/ folder, e.g.
    git clone https://github.com/seohongpark/ogbench /tmp/ogbench_ref     # or: git archive from a mirror
    export OGBENCH_IMPLS=/tmp/ogbench_ref/impls
Its extra dependencies (ml_collections, distrax) go into a separate venv that also sees the project's packages:
    python -m venv /tmp/gciql_venv
    echo /path/to/project-venv/lib/python3.11/site-packages > /tmp/gciql_venv/lib/python3.11/site-packages/p.pth
    /tmp/gciql_venv/bin/pip install ml_collections distrax
Run (from the repository root):
    /tmp/gciql_venv/bin/python tests/benchmarks/bench_keystate_gciql.py --steps 10 --rounds 3
A local OGBench .npz can replace the default dataset (pointmaze-medium, built offline by tests/support/keystate_data.py):
    ... --env-name antmaze-large-navigate-v0 --dataset-path ~/.ogbench/data/antmaze-large-navigate-v0.npz
"""

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "support"))


def load_ours():
    spec = importlib.util.spec_from_file_location("keystate_gciql", REPO / "keystate_gciql.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--env-name", default="pointmaze-medium-navigate-v0")
    p.add_argument(
        "--dataset-path",
        default=None,
        help="OGBench-layout .npz (default: build pointmaze offline)",
    )
    p.add_argument(
        "--episodes",
        type=int,
        default=100,
        help="episodes of the offline-built dataset (1001 rows each)",
    )
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10, help="timed gradient steps per round and side")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--ogbench-impls", default=os.environ.get("OGBENCH_IMPLS", "/tmp/ogbench_ref/impls")
    )
    p.add_argument("--json-out", default=None)
    a = p.parse_args()

    ks = load_ours()
    if a.dataset_path is None:
        from keystate_data import build_pointmaze

        a.dataset_path = str(Path("/tmp") / f"bench_pointmaze_{a.episodes}.npz")
        if not Path(a.dataset_path).exists():
            build_pointmaze(a.dataset_path, "medium", a.episodes, 1001, seed=0)
    env, ds = ks.make_env_and_dataset(ks.Args(env_name=a.env_name, dataset_path=a.dataset_path))
    ob_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    print(
        f"dataset {a.dataset_path}: {len(ds['valids'])} rows, ob_dim={ob_dim}, act_dim={act_dim}; "
        f"jax {jax.__version__} on {jax.devices()[0].platform}"
    )

    # ---- ours: jitted update with on-device sampling (key-state arm with a fixed rule; HER arm)
    args = ks.resolve_presets(
        ks.Args(env_name=a.env_name, batch_size=a.batch_size, hidden_dims=(512, 512, 512))
    )
    feats = ks.Features(ds, {})
    key_mask = ks.compile_condition("norm(delta(s0, 3), delta(s1, 3)) < 0.3", feats)
    ours = {}
    for arm, mask in (("keystate", key_mask), ("her", None)):
        # the HER arm: no key state, so the sampler is OGBench's mixture; one seed (leading axis of size 1)
        data = ks.make_goal_data(ds, mask, np.ones((1, len(ds["valids"])), bool))
        nets, tx, state = ks.make_agent(args, ob_dim, act_dim, jax.random.PRNGKey(0))
        state = jax.tree_util.tree_map(lambda x: x[None], state)
        update, _ = ks.make_update(args, nets, tx)
        p_key = jnp.full(1, 0.5)
        t0 = time.time()
        state, info = update(state, data, p_key)
        jax.block_until_ready(state)
        print(f"ours[{arm}] compile + first step: {time.time() - t0:.1f}s")
        ours[arm] = [update, state, data, p_key]

    # ---- reference: OGBench impls (GCDataset.sample in NumPy + jitted GCIQLAgent.update)
    impls = Path(a.ogbench_impls)
    if not (impls / "agents" / "gciql.py").exists():
        sys.exit(f"reference not found at {impls}; see the module docstring (OGBENCH_IMPLS)")
    sys.path.insert(0, str(impls))
    from agents.gciql import GCIQLAgent, get_config  # noqa: E402
    from utils.datasets import Dataset as RefDataset  # noqa: E402
    from utils.datasets import GCDataset

    config = get_config()
    config["batch_size"] = a.batch_size
    config["alpha"] = args.alpha
    config["discount"] = args.discount
    import ogbench

    _, train, _ = ogbench.make_env_and_datasets(
        a.env_name, dataset_path=a.dataset_path, compact_dataset=True
    )
    ref_ds = GCDataset(RefDataset.create(**train), config)
    np.random.seed(0)
    ref_agent = GCIQLAgent.create(
        0, ref_ds.sample(1)["observations"], ref_ds.sample(1)["actions"], config
    )
    t0 = time.time()
    ref_agent, _ = ref_agent.update(ref_ds.sample(a.batch_size))
    jax.block_until_ready(ref_agent)
    print(f"reference compile + first step: {time.time() - t0:.1f}s")

    # ---- interleaved timing rounds
    times = {"ours_keystate": [], "ours_her": [], "reference": []}

    def run_ours(arm):
        update, state, data, p_key = ours[arm]
        t0 = time.time()
        for _ in range(a.steps):
            state, info = update(state, data, p_key)
        jax.block_until_ready(state)
        times[f"ours_{arm}"].append(a.steps / (time.time() - t0))
        ours[arm][1] = state

    def run_reference():
        nonlocal ref_agent
        t0 = time.time()
        for _ in range(a.steps):
            ref_agent, _ = ref_agent.update(ref_ds.sample(a.batch_size))
        jax.block_until_ready(ref_agent)
        times["reference"].append(a.steps / (time.time() - t0))

    for r in range(a.rounds):
        # the order alternates between rounds so that neither side always runs first (warm caches, load drift)
        order = [lambda: run_ours("keystate"), lambda: run_ours("her"), run_reference]
        for fn in order if r % 2 == 0 else order[::-1]:
            fn()
        print(f"round {r}: " + ", ".join(f"{k}={v[-1]:.3f} steps/s" for k, v in times.items()))

    med = {k: float(np.median(v)) for k, v in times.items()}
    result = {
        "dataset": a.dataset_path,
        "rows": int(len(ds["valids"])),
        "batch_size": a.batch_size,
        "hidden": [512, 512, 512],
        "steps_per_round": a.steps,
        "rounds": a.rounds,
        "median_steps_per_s": med,
        "ratio_ours_keystate_vs_reference": med["ours_keystate"] / med["reference"],
        "ratio_ours_her_vs_reference": med["ours_her"] / med["reference"],
    }
    print(json.dumps(result, indent=2))
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
