"""Benchmark: gradient steps per second of keystate_hiql.py against OGBench's reference HIQL, side by side.

Both learners get the same dataset (OGBench's compact layout), batch size and networks (3x512 GELU MLPs, LayerNorm in
value and phi, rep_dim 10, two value heads); each step includes drawing the relabeled batch, as in each one's
training loop: the reference samples with NumPy (impls/utils/datasets.py HGCDataset) and runs its jitted
`agent.update`; the script samples on device inside its jitted update. Before timing, the benchmark checks that both
compute the same losses and the same parameter update from the same initial parameters and batch.

The reference is not part of this repository. Get it and its one extra dependency (ml_collections), e.g.:
    git clone https://github.com/seohongpark/ogbench /tmp/ogbench        # or any copy of its impls/ folder
    pip install --target /tmp/bench_site ml_collections
    PYTHONPATH=/tmp/bench_site python tests/benchmarks/bench_keystate_hiql.py --ogbench-impls /tmp/ogbench/impls
OGBench's networks import distrax, whose TensorFlow-Probability backend does not import under jax 0.10; when
`import distrax` fails, a small stand-in with the one distribution HIQL uses (MultivariateNormalDiag: log_prob, mode,
sample) is put on sys.path (see DISTRAX_STANDIN). Data: a synthetic antmaze-shaped dataset (29-D states, 8-D actions,
episodes of 1001 rows) unless --dataset-path points to an OGBench .npz (e.g. ~/.ogbench/data/antmaze-large-navigate-v0.npz).
"""

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

REPO = Path(__file__).resolve().parents[2]

DISTRAX_STANDIN = '''
"""Stand-in for the parts of distrax that OGBench's impls/utils/networks.py touches (HIQL/GCIQL use only
MultivariateNormalDiag with a diagonal scale); same formulas as distrax."""
import jax
import jax.numpy as jnp


class MultivariateNormalDiag:
    def __init__(self, loc, scale_diag):
        self.loc, self.scale_diag = loc, scale_diag

    def log_prob(self, x):
        z = (x - self.loc) / self.scale_diag
        return jnp.sum(-0.5 * z**2 - jnp.log(self.scale_diag) - 0.5 * jnp.log(2 * jnp.pi), axis=-1)

    def mode(self):
        return self.loc

    def sample(self, seed):
        return self.loc + self.scale_diag * jax.random.normal(seed, self.loc.shape)


class Categorical:
    def __init__(self, logits):
        self.logits = logits


class Transformed:
    def __init__(self, distribution, bijector):
        self.distribution, self.bijector = distribution, bijector


class Block:
    def __init__(self, bijector, ndims):
        self.bijector = bijector


class Tanh:
    pass
'''


def import_reference(impls: str):
    if not (Path(impls) / "agents" / "hiql.py").exists():
        raise SystemExit(
            f"error: {impls} is not OGBench's impls/ folder (no agents/hiql.py); see the docstring"
        )
    try:
        import distrax  # noqa: F401
    except Exception:
        d = Path(tempfile.mkdtemp()) / "distrax"
        d.mkdir()
        (d / "__init__.py").write_text(DISTRAX_STANDIN)
        sys.path.insert(0, str(d.parent))
        print(f"[bench] distrax does not import here; using the stand-in in {d}")
    try:
        import ml_collections  # noqa: F401
    except ImportError:
        raise SystemExit(
            "error: the reference needs ml_collections (pip install --target DIR ml_collections and put "
            "DIR on PYTHONPATH)"
        ) from None
    sys.path.insert(0, str(impls))
    from agents.hiql import HIQLAgent, get_config
    from utils.datasets import Dataset, HGCDataset

    return HIQLAgent, get_config, Dataset, HGCDataset


def load_script():
    spec = importlib.util.spec_from_file_location("keystate_hiql", REPO / "keystate_hiql.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def synthetic_dataset(episodes: int, ep_len: int, ob_dim: int, act_dim: int, seed: int = 0):
    """Antmaze-shaped random walks (x-y drift plus noisy joint dims), OGBench's file layout."""
    rng = np.random.default_rng(seed)
    n = episodes * ep_len
    obs = rng.normal(size=(n, ob_dim)).astype(np.float32)
    steps = rng.normal(scale=0.1, size=(episodes, ep_len, 2)).cumsum(1).reshape(n, 2)
    obs[:, :2] = steps + rng.uniform(0, 40, size=(episodes, 1, 2)).repeat(ep_len, 1).reshape(n, 2)
    act = rng.uniform(-1, 1, size=(n, act_dim)).astype(np.float32)
    term = np.zeros(n, np.float32)
    term[ep_len - 1 :: ep_len] = 1
    return obs, act, term


def actor_params(m):
    """OGBench's GCActor (actor_net MLP, then mean_net Dense) -> the script's one MLP whose last Dense is the mean."""
    n = len(m["actor_net"])
    return {**m["actor_net"], f"Dense_{n}": m["mean_net"]}


def ref_to_script_params(p):
    """OGBench ModuleDict parameters -> the script's {goal_rep, value, low_actor, high_actor} + target value."""
    params = {
        "goal_rep": p["modules_goal_rep"][
            "layers_0"
        ],  # the MLP of Sequential([MLP, LengthNormalize])
        "value": {"VmapMLP_0": p["modules_value"]["value_net"]},
        "low_actor": actor_params(p["modules_low_actor"]),
        "high_actor": actor_params(p["modules_high_actor"]),
    }
    return params, {"VmapMLP_0": p["modules_target_value"]["value_net"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--ogbench-impls",
        default=os.environ.get("OGBENCH_IMPLS"),
        help="path to OGBench's impls/ folder (or $OGBENCH_IMPLS)",
    )
    ap.add_argument(
        "--dataset-path", default=None, help="OGBench .npz (default: synthetic antmaze-shaped data)"
    )
    ap.add_argument("--episodes", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--hidden-dims", type=int, nargs="+", default=[512, 512, 512])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per round and learner")
    ap.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds (reference, script, reference, ...)",
    )
    ap.add_argument(
        "--relabel",
        choices=["her", "keystate"],
        default="keystate",
        help="the script's arm; keystate marks every 10th row as a key state (p_keystate 0.5)",
    )
    a = ap.parse_args()
    if not a.ogbench_impls:
        raise SystemExit("error: pass --ogbench-impls (OGBench's impls/ folder); see the docstring")
    HIQLAgent, get_config, RefDataset, HGCDataset = import_reference(a.ogbench_impls)
    ks = load_script()

    if a.dataset_path:
        f = np.load(a.dataset_path)
        obs, act, term = (
            f["observations"].astype(np.float32),
            f["actions"].astype(np.float32),
            f["terminals"],
        )
        term = term.astype(np.float32)
    else:
        obs, act, term = synthetic_dataset(a.episodes, 1001, 29, 8)
    # OGBench's compact layout, as ogbench.load_dataset(compact_dataset=True) returns it
    ds = {
        "observations": obs,
        "actions": act,
        "terminals": np.minimum(term + np.append(term[1:], 1), 1),
        "valids": 1.0 - term,
    }
    hd = tuple(a.hidden_dims)
    print(
        f"[bench] {jax.devices()[0].platform}, {len(obs)} rows, ob_dim={obs.shape[1]}, batch={a.batch_size}, "
        f"hidden={hd}"
    )

    # Reference: OGBench's HIQL with its default config (antmaze-large-navigate: alphas 3.0, subgoal_steps 25).
    cfg = get_config()
    cfg.batch_size, cfg.value_hidden_dims, cfg.actor_hidden_dims = a.batch_size, hd, hd
    ref_ds = HGCDataset(RefDataset.create(**ds), cfg)
    np.random.seed(0)
    ex = ref_ds.sample(1)
    agent = HIQLAgent.create(0, ex["observations"], ex["actions"], cfg)

    # The script with the same settings.
    args = ks.resolve_presets(ks.Args(batch_size=a.batch_size, hidden_dims=hd, relabel=a.relabel))
    key_mask = None
    if a.relabel == "keystate":
        key_mask = np.zeros(len(obs), bool)
        key_mask[::10] = True
    # the HER arm: no key state, so the sampler is OGBench's mixture; one seed (leading axis of size 1)
    data = ks.make_goal_data(ds, key_mask, np.ones((1, len(obs)), bool))
    nets, tx, state = ks.make_agent(args, obs.shape[1], act.shape[1], jax.random.PRNGKey(0))
    update, _ = ks.make_update(args, nets, tx)
    p_key = jnp.full(1, args.p_keystate if key_mask is not None else 0.0)

    # 1) Same networks, same numbers: start the script from the reference's parameters and compare.
    params, target = ref_to_script_params(agent.network.params)
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(state.params), (
        "network mismatch"
    )
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_equal(x.shape, y.shape), params, state.params
    )
    batch = ref_ds.sample(a.batch_size)
    _, ref_info = agent.total_loss(batch, agent.network.params)
    jb = {k: jnp.asarray(v) for k, v in batch.items()}
    mine = {
        "value/value_loss": ks.value_loss(params, target, jb, nets, args.discount, ks.EXPECTILE)[0],
        "low_actor/actor_loss": ks.low_actor_loss(params, jb, nets, args.low_alpha)[0],
        "high_actor/actor_loss": ks.high_actor_loss(params, jb, nets, args.high_alpha)[0],
    }
    for k, v in mine.items():
        rel = abs(float(v) - float(ref_info[k])) / max(abs(float(ref_info[k])), 1e-8)
        print(
            f"[check] {k}: reference {float(ref_info[k]):.6f}  script {float(v):.6f}  rel. diff {rel:.1e}"
        )
        assert rel < 1e-4, k

    # 2) Throughput, alternating rounds so that both see the same machine load.
    state = jax.tree_util.tree_map(
        lambda x: x[None], state
    )  # the update takes a leading seed axis (one seed here)

    def run_ref(n):
        nonlocal agent
        for _ in range(n):
            agent, info = agent.update(ref_ds.sample(a.batch_size))
        jax.block_until_ready(agent.network.params)

    def run_script(n):
        nonlocal state
        for _ in range(n):
            state, info = update(state, data, p_key)
        jax.block_until_ready(state.params)

    t0 = time.time()
    run_ref(1)
    t1 = time.time()
    run_script(1)
    t2 = time.time()
    print(f"[bench] first step (compile): reference {t1 - t0:.1f}s, script {t2 - t1:.1f}s")
    ref_sps, my_sps = [], []
    for r in range(a.rounds):
        t = time.time()
        run_ref(a.steps)
        ref_sps.append(a.steps / (time.time() - t))
        t = time.time()
        run_script(a.steps)
        my_sps.append(a.steps / (time.time() - t))
        print(
            f"[bench] round {r}: reference {ref_sps[-1]:.3f} steps/s, script {my_sps[-1]:.3f} steps/s, "
            f"ratio {my_sps[-1] / ref_sps[-1]:.2f}"
        )
    ref_med, my_med = float(np.median(ref_sps)), float(np.median(my_sps))
    print(
        f"RESULT reference_hiql={ref_med:.3f} steps/s  keystate_hiql={my_med:.3f} steps/s  "
        f"ratio(script/reference)={my_med / ref_med:.2f}  (batch {a.batch_size}, hidden {hd}, relabel {a.relabel})"
    )


if __name__ == "__main__":
    main()
