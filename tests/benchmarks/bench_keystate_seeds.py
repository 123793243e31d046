"""Benchmark (--num-seeds): N seeds in one jitted update vs N one-seed updates run one after the other, for
keystate_gciql.py and keystate_hiql.py. Same dataset, same batch and network sizes, key-state sampling on, the same
number of steps per jitted call in both ways (`--chunk`; main() uses a divisor of 100 and of every interval). The one
call is `over_seeds`: jax.vmap on GPU/TPU, a lax.map loop inside the jit on CPU (XLA:CPU's batched matmuls made the
vmapped update 3.5x slower per seed here).

    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        taskset -c 0 python tests/benchmarks/bench_keystate_seeds.py --seeds 8 --steps 20 --chunk 20

Reports gradient steps per second summed over seeds (N seeds x steps / time) for both ways, and their ratio.
Profiled on one CPU core (GCIQL, batch 256, 3x256, 8 seeds, seed-steps/s): one seed alone 99; 8 seeds with one step
per call 69 (0.69x); 8 one-seed updates called round robin 85 (cache: 8 seeds' parameters and Adam moments, ~60 MB,
do not fit the 32 MB L3; one seed's do); 8 seeds unrolled in the jit 44; vmapped 34. With 10 steps of a seed per
call before the next seed's (a scan inside the seed loop), 8 seeds ran at 97. The per-seed data subsets and host syncs
did not matter. On a GPU, where one small update leaves the device mostly idle, vmapping is where the gain is (not
measured: no GPU in this project's CPU sessions).
"""

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "support"))


def load(script):
    spec = importlib.util.spec_from_file_location(script, REPO / f"{script}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def steps_per_second(update, state, data, p_key, n_seeds, steps, rounds, chunk):
    state, _ = update(state, data, p_key)  # compile
    jax.block_until_ready(state)
    best = 0.0
    for _ in range(rounds):
        t = time.time()
        for _ in range(steps // chunk):
            state, _ = update(state, data, p_key)
        jax.block_until_ready(state)
        best = max(best, n_seeds * steps / (time.time() - t))
    return best


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--scripts", nargs="+", default=["keystate_gciql", "keystate_hiql"])
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--chunk", type=int, default=20, help="steps per jitted call (divides --steps)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden-dims", type=int, nargs="+", default=[256, 256, 256])
    p.add_argument(
        "--episodes", type=int, default=20, help="episodes of the offline-built pointmaze dataset"
    )
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    from keystate_data import build_pointmaze

    path = Path("/tmp") / f"bench_seeds_pointmaze_{a.episodes}.npz"
    if not path.exists():
        build_pointmaze(path, "medium", a.episodes, 1001, seed=0)
    out = {}
    for script in a.scripts:
        ks = load(script)
        args = ks.resolve_presets(
            ks.Args(
                env_name="pointmaze-medium-navigate-v0",
                dataset_path=str(path),
                batch_size=a.batch_size,
                hidden_dims=tuple(a.hidden_dims),
                num_seeds=a.seeds,
            )
        )
        _, ds = ks.make_env_and_dataset(args)
        key_mask = ks.compile_condition(
            "norm(delta(s0, 3), delta(s1, 3)) < 0.3", ks.Features(ds, {})
        )
        keep = ks.episode_subsets(ds, args)
        ob_dim, act_dim = ds["observations"].shape[1], ds["actions"].shape[1]
        nets, tx, _ = ks.make_agent(args, ob_dim, act_dim, jax.random.PRNGKey(0))
        update, _ = ks.make_update(args, nets, tx, a.chunk)

        def agents(seeds):
            keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
            return jax.vmap(lambda k: ks.make_agent(args, ob_dim, act_dim, k)[2])(keys)

        vmapped = steps_per_second(
            update,
            agents(range(a.seeds)),
            ks.make_goal_data(ds, key_mask, keep),
            jnp.full(a.seeds, 0.5),
            a.seeds,
            a.steps,
            a.rounds,
            a.chunk,
        )
        # N one-seed runs, one after the other (as N separate processes would, minus their start-up)
        one = [ks.make_goal_data(ds, key_mask, keep[i : i + 1]) for i in range(a.seeds)]
        t_total = 0.0
        for i in range(a.seeds):
            sps = steps_per_second(
                update, agents([i]), one[i], jnp.full(1, 0.5), 1, a.steps, a.rounds, a.chunk
            )
            t_total += a.steps / sps
        sequential = a.seeds * a.steps / t_total
        out[script] = dict(
            vmapped_sps=vmapped, sequential_sps=sequential, ratio=vmapped / sequential
        )
        print(
            f"{script}: {a.seeds} seeds in one call {vmapped:.1f} seed-steps/s, sequential {sequential:.1f}, "
            f"ratio {vmapped / sequential:.2f} (batch {a.batch_size}, hidden {a.hidden_dims}, chunk {a.chunk}, "
            f"{jax.default_backend()})"
        )
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
