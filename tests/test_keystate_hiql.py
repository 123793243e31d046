"""Tests for keystate_hiql.py (the HIQL sibling of keystate_gciql.py): its copy of the rule compiler, HIQL's goal /
subgoal sampling and the key-state relabeling against slow loops, the HIQL losses against a hand computation, the
update and the hierarchical policy, bad inputs, and an end-to-end smoke run on a pointmaze dataset built offline by
tests/support/keystate_data.py."""

import importlib.util
import json
import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = "keystate_hiql.py"
# Small but real: a tiny network keeps the smoke run inside the CI budget; everything else is the script's default path.
SMALL = [
    "--env-name",
    "pointmaze-medium-navigate-v0",
    "--total-steps",
    "60",
    "--batch-size",
    "64",
    "--hidden-dims",
    "32",
    "32",
    "--log-interval",
    "20",
    "--eval-every",
    "0",
    "--eval-episodes",
    "1",
    "--adapt-interval",
    "10",
]


@pytest.fixture(scope="module")
def ks():
    spec = importlib.util.spec_from_file_location("keystate_hiql", REPO / SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def episodes(ks, n_ep, ep_len, ob_dim=1, seed=None):
    """n_ep episodes of ep_len rows as ogbench.load_dataset(compact_dataset=True) returns them; observations = row
    index unless seeded noise."""
    term = np.zeros(n_ep * ep_len, np.float32)
    term[ep_len - 1 :: ep_len] = 1
    if seed is None:
        obs = np.repeat(np.arange(n_ep * ep_len, dtype=np.float32)[:, None], ob_dim, 1)
    else:
        obs = np.random.default_rng(seed).normal(size=(n_ep * ep_len, ob_dim)).astype(np.float32)
    return {
        "observations": obs,
        "actions": np.zeros((len(obs), 2), np.float32),
        "terminals": np.minimum(term + np.append(term[1:], 1), 1),
        "valids": 1.0 - term,
    }


# ---------------------------------------------------------------------------------------------------------------- help
def test_help(run_script):
    r = run_script(SCRIPT, "--help", timeout=60)
    for flag in (
        "--relabel",
        "--p-keystate",
        "--rules-path",
        "--subgoal-steps",
        "--high-alpha",
        "--num-seeds",
    ):
        assert flag in r.output, flag


def test_presets_follow_ogbench(ks, capsys):
    a = ks.resolve_presets(ks.Args())
    assert (a.env_name, a.subgoal_steps, a.high_alpha, a.low_alpha, a.discount, ks.EXPECTILE) == (
        "antmaze-large-navigate-v0",
        25,
        3.0,
        3.0,
        0.99,
        0.7,
    )
    assert (a.total_steps, a.batch_size, ks.REP_DIM, a.keystate_window) == (500_000, 1024, 10, 200)
    for env_name in ("cube-single-play-v0", "scene-play-v0", "puzzle-3x3-play-v0"):
        assert ks.resolve_presets(ks.Args(env_name=env_name)).subgoal_steps == 10
    humanoid = ks.resolve_presets(ks.Args(env_name="humanoidmaze-medium-navigate-v0"))
    assert (humanoid.subgoal_steps, humanoid.discount, humanoid.high_alpha) == (100, 0.995, 3.0)
    assert ks.resolve_presets(ks.Args(env_name="antmaze-giant-navigate-v0")).discount == 0.995
    assert ks.resolve_presets(ks.Args(env_name="antmaze-large-explore-v0")).high_alpha == 10.0
    assert (
        ks.resolve_presets(ks.Args(env_name="cube-single-play-v0", subgoal_steps=7)).subgoal_steps
        == 7
    )
    with pytest.raises(SystemExit) as e:
        ks.check_args(ks.Args(subgoal_steps=0))  # its declared range; unset: the per-env value
    assert (
        e.value.code == 2
        and capsys.readouterr().err == "error: --subgoal-steps: must be in [1, 16384], got 0\n"
    )


# ------------------------------------------------------------------------------------------------------------ compiler
@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo pwned') > 0",
        "x.__class__ > 0",
        "__builtins__ > 0",
        "open('/etc/passwd') > 0",
        "x[0] > 0",
        "(lambda: 1)() > 0",
        "x ** 1000 > 0",
        "2 ** 10 ** 10 > 0",
        "prev(x, 1000) > 0",
        "unknown_feature > 1",
        "x > " + "1" * 400,  # a 400-digit literal
        "x>" + "9" * 396,  # the longest literal that fits the length bound: beyond float range
        "x > 1" + "0" * 380,
        "x > 1e999",
        "prev(next(x, 15), 10) > 0",  # nested lags beyond the temporal window
        "delta(" * 26 + "x" + ", 1)" * 26 + " > 0",
    ],
)
def test_compiler_rejects_hostile_rules(ks, expr, capfd):
    ds = episodes(ks, 2, 5, ob_dim=2)
    feats = ks.Features(ds, {"x": 0, "y": 1})
    with pytest.raises(ks.RuleError):
        ks.compile_condition(expr, feats)
    assert "pwned" not in capfd.readouterr().out
    mask = ks.compile_condition(
        "delta(x, 1) == 1 and y >= 2", feats
    )  # a valid rule still compiles and runs
    np.testing.assert_array_equal(mask, (np.arange(10) >= 2) & ~np.isin(np.arange(10), [0, 5]))


# ------------------------------------------------------------------------------------------------------------ sampling
def test_hiql_subgoals_match_slow_loop(ks):
    """Low-level subgoal, high-level goal and high-level target vs OGBench's HGCDataset.sample, written as a loop."""
    import jax

    ds = episodes(ks, 3, 40)
    data = ks.make_goal_data(ds, None)
    final = np.asarray(data["final_idxs"])
    k = 7
    # future-state high-level goals (navigate datasets), then random ones (explore datasets: OGBench's actor mix)
    for env_name, p_rand in (
        ("pointmaze-medium-navigate-v0", 0.0),
        ("antmaze-large-explore-v0", 1.0),
    ):
        args = ks.resolve_presets(ks.Args(env_name=env_name, batch_size=50_000, subgoal_steps=k))
        b = jax.tree_util.tree_map(
            np.asarray, ks.sample_batch(jax.random.PRNGKey(0), data, args, 0.0)
        )
        t = b["observations"][:, 0].astype(int)  # observation = row index
        low, goal, target = (
            b[key][:, 0].astype(int)
            for key in ("low_actor_goals", "high_actor_goals", "high_actor_targets")
        )
        np.testing.assert_array_equal(low, np.minimum(t + k, final[t]))  # w = s_{min(t+k, T)}
        if p_rand == 1.0:  # random goals anywhere; target s_{min(t+k, T)}
            np.testing.assert_array_equal(target, np.minimum(t + k, final[t]))
            assert len(np.unique(goal)) > 100
            continue
        # future goals in (t, T] of the same episode (t itself only at T); target s_{min(t+k, g)}
        assert ((goal > t) | (goal == final[t])).all() and (goal <= final[t]).all()
        np.testing.assert_array_equal(target, np.minimum(t + k, goal))
        # uniform over (t, T] with OGBench's rounding: compare with the slow loop for two rows
        rng = np.random.default_rng(0)
        for row in (3, 50):
            sel = t == row
            lo, hi = min(row + 1, final[row]), final[row]
            slow = [int(np.round(lo * d + hi * (1 - d))) for d in rng.random(20_000)]
            tv = (
                0.5
                * np.abs(
                    np.bincount(goal[sel], minlength=120) / sel.sum()
                    - np.bincount(slow, minlength=120) / len(slow)
                ).sum()
            )
            assert tv < 0.2, (
                row,
                tv,
                sel.sum(),
            )  # ~400 samples of a row: loose bound (exact rule checked above)


def slow_value_goal(
    rng, idx, valid_idxs, final_idxs, key_set, p_cur, p_traj, discount, p_key, window
):
    """The obvious per-sample loop: OGBench's mixture, future branch replaced by a key state w.p. p_key."""
    if rng.random() < p_cur:
        return idx
    if rng.random() < p_traj / (1 - p_cur):
        final = final_idxs[idx]
        keys = [j for j in range(idx + 1, min(idx + window, final) + 1) if j in key_set]
        if keys and rng.random() < p_key:
            return keys[rng.integers(len(keys))]
        return min(idx + rng.geometric(1 - discount), final)
    return valid_idxs[rng.integers(len(valid_idxs))]


def test_keystate_value_goals_match_slow_loop(ks):
    import jax
    import jax.numpy as jnp

    ds = episodes(ks, 3, 40)
    key_mask = np.zeros(120, bool)
    key_mask[[5, 12, 13, 30, 38, 39, 50, 70]] = True
    data = ks.make_goal_data(ds, key_mask)
    valid_idxs, final = np.asarray(data["valid_idxs"]), np.asarray(data["final_idxs"])
    key_set = set(np.nonzero(key_mask & (ds["valids"] > 0))[0].tolist())
    n, rng = 30_000, np.random.default_rng(0)
    for idx in (3, 11, 45):  # key states in the window / several / none
        goals, is_key, _ = map(
            np.asarray,
            ks.sample_goals(
                jax.random.PRNGKey(idx),
                data,
                jnp.full((n,), idx),
                0.9,
                0.7,
                20,
                p_cur=0.2,
                p_traj=0.5,
                geometric=True,
            ),
        )
        slow = [
            slow_value_goal(rng, idx, valid_idxs, final, key_set, 0.2, 0.5, 0.9, 0.7, 20)
            for _ in range(n)
        ]
        tv = (
            0.5
            * np.abs(
                np.bincount(goals, minlength=120) / n - np.bincount(slow, minlength=120) / n
            ).sum()
        )
        assert tv < 0.03, (idx, tv)
        assert set(goals[is_key].tolist()) <= key_set


# -------------------------------------------------------------------------------------------------------------- losses
def np_mlp(params, x, layer_norm, activate_final):
    """Hand forward pass of OGBench's MLP: Dense -> GELU (tanh approx., flax default) -> LayerNorm."""

    def gelu(z):
        return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))

    n = len([k for k in params if k.startswith("Dense_")])
    for i in range(n):
        d = params[f"Dense_{i}"]
        x = x @ np.asarray(d["kernel"]) + np.asarray(d["bias"])
        if i + 1 < n or activate_final:
            x = gelu(x)
            if layer_norm:
                ln = params[f"LayerNorm_{i}"]
                mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
                x = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(ln["scale"]) + np.asarray(
                    ln["bias"]
                )
    return x


def test_hiql_losses_match_hand_computation(ks, monkeypatch):
    import jax

    monkeypatch.setattr(ks, "REP_DIM", 3)
    args = ks.resolve_presets(ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(8, 8)))
    ob_dim, act_dim, b = 3, 2, 6
    nets, tx, state = ks.make_agent(args, ob_dim, act_dim, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    # perturb every parameter (LayerNorm scales/biases start at 1/0) and the target heads
    p = jax.tree_util.tree_map(
        lambda a: np.asarray(a) + 0.3 * rng.normal(size=a.shape).astype(np.float32), state.params
    )
    target = jax.tree_util.tree_map(lambda a: a + 0.1, p["value"])
    batch = {
        k: rng.normal(size=(b, ob_dim)).astype(np.float32)
        for k in [
            "observations",
            "next_observations",
            "value_goals",
            "low_actor_goals",
            "high_actor_goals",
            "high_actor_targets",
        ]
    }
    batch["actions"] = rng.uniform(-1, 1, size=(b, act_dim)).astype(np.float32)
    batch["masks"] = np.array([1, 1, 0, 1, 1, 0], np.float32)
    batch["rewards"] = batch["masks"] - 1.0

    def phi(s, g):
        x = np_mlp(p["goal_rep"], np.concatenate([s, g], 1), True, False)
        return x / np.linalg.norm(x, axis=1, keepdims=True) * np.sqrt(3)

    def V(vp, s, g):  # two heads on [s, phi([s; g])]
        inp = np.concatenate([s, phi(s, g)], 1)
        return [
            np_mlp(jax.tree_util.tree_map(lambda t: t[e], vp["VmapMLP_0"]), inp, True, False)[:, 0]
            for e in range(2)
        ]

    def actor_mean(ap, s, g):  # the last Dense layer is the Gaussian mean (no activation)
        return np_mlp(ap, np.concatenate([s, g], 1), False, False)

    s, s2, r, m = (
        batch["observations"],
        batch["next_observations"],
        batch["rewards"],
        batch["masks"],
    )
    # value: expectile 0.7; weight from the target advantage, errors from the online heads
    nv1, nv2 = V(target, s2, batch["value_goals"])
    adv = r + 0.99 * m * np.minimum(nv1, nv2) - np.mean(V(target, s, batch["value_goals"]), 0)
    v1, v2 = V(p["value"], s, batch["value_goals"])
    w = np.where(adv >= 0, 0.7, 0.3)
    want_v = np.mean(w * (r + 0.99 * m * nv1 - v1) ** 2) + np.mean(
        w * (r + 0.99 * m * nv2 - v2) ** 2
    )
    got_v, info = jax.jit(lambda *x: ks.value_loss(*x, nets, 0.99, 0.7))(
        p, target, batch
    )  # jit: one compile
    assert float(got_v) == pytest.approx(want_v, rel=1e-4)
    q = r + 0.99 * m * np.minimum(nv1, nv2)
    np.testing.assert_allclose(
        np.asarray(info["td_abs"]), np.abs(q - (v1 + v2) / 2), rtol=1e-4, atol=1e-6
    )

    def logp(mu, x):  # unit-std Gaussian (const_std)
        return np.sum(-0.5 * (x - mu) ** 2 - 0.5 * np.log(2 * np.pi), 1)

    # low level: AWR toward the dataset action given phi([s; w]), weight exp(3 (V(s', w) - V(s, w))) capped at 100
    wg = batch["low_actor_goals"]
    adv_l = np.mean(V(p["value"], s2, wg), 0) - np.mean(V(p["value"], s, wg), 0)
    want_l = -np.mean(
        np.minimum(np.exp(3.0 * adv_l), 100)
        * logp(actor_mean(p["low_actor"], s, phi(s, wg)), batch["actions"])
    )
    got_l, _ = jax.jit(lambda *x: ks.low_actor_loss(*x, nets, 3.0))(p, batch)
    assert float(got_l) == pytest.approx(want_l, rel=1e-4)
    # high level: AWR toward phi([s; s_{t+k}]), weight exp(3 (V(s_{t+k}, g) - V(s, g)))
    g, st = batch["high_actor_goals"], batch["high_actor_targets"]
    adv_h = np.mean(V(p["value"], st, g), 0) - np.mean(V(p["value"], s, g), 0)
    want_h = -np.mean(
        np.minimum(np.exp(3.0 * adv_h), 100) * logp(actor_mean(p["high_actor"], s, g), phi(s, st))
    )
    got_h, _ = jax.jit(lambda *x: ks.high_actor_loss(*x, nets, 3.0))(p, batch)
    assert float(got_h) == pytest.approx(want_h, rel=1e-4)
    # the hierarchical policy: high-level mean renormalised to length sqrt(rep_dim) -> low-level mean, clipped
    act = ks.make_policy(nets)
    h = actor_mean(p["high_actor"], s[:1], g[:1])
    h = h / np.linalg.norm(h) * np.sqrt(3)
    want_a = np.clip(actor_mean(p["low_actor"], s[:1], h)[0], -1, 1)
    np.testing.assert_allclose(np.asarray(act(p, s[0], g[0])), want_a, rtol=1e-4, atol=1e-6)


def test_update_gradients_and_soft_target(ks):
    import jax
    import jax.numpy as jnp

    args = ks.resolve_presets(
        ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(16, 16), batch_size=32)
    )
    ds = episodes(ks, 4, 50, ob_dim=2, seed=0)
    key_mask = np.zeros(len(ds["valids"]), bool)
    key_mask[7::11] = True
    data = ks.make_goal_data(ds, key_mask, np.ones((1, len(key_mask)), bool))
    nets, tx, _ = ks.make_agent(args, 2, 2, jax.random.PRNGKey(0))
    state = jax.vmap(lambda k: ks.make_agent(args, 2, 2, k)[2])(
        jax.random.PRNGKey(0)[None]
    )  # one seed, as main()
    update, probe = ks.make_update(args, nets, tx)
    old = jax.tree_util.tree_map(
        np.array, state
    )  # host copies: the update donates (reuses) the state's buffers
    new, info = update(state, data, jnp.zeros(1))
    # target <- tau * value(before the step) + (1 - tau) * target, as OGBench's hiql.py
    want = jax.tree_util.tree_map(
        lambda c, t: 0.005 * c + 0.995 * t, old.params["value"], old.target
    )
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.target, want
    )
    for name in ("goal_rep", "value", "low_actor", "high_actor"):  # every module is trained
        before, after = (
            jax.tree_util.tree_leaves(old.params[name]),
            jax.tree_util.tree_leaves(new.params[name]),
        )
        assert not all(np.allclose(x, y) for x, y in zip(before, after)), name
    assert float(info["relabel/frac_keystate_goals"][0, 0]) == 0  # p_keystate 0: no key goals
    # the paired probe scores the same rows under four goals with HIQL's value: |q - V| as in value_loss
    td, dist, counts = map(np.asarray, probe(new, data))
    assert (
        td.shape == (1, 4, 32)
        and counts.any()
        and (td >= 0).all()
        and not np.allclose(td[0, 0], td[0, 1])
    )


# --------------------------------------------------------------------------------------------------------- smoke run
def test_smoke_with_rules_file(run_script, pointmaze_npz, tmp_path):
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "name": "turning_event",
                        "description": "direction of motion changes",
                        "condition": "abs(delta(x, 5) * delta(next(y, 5), 5) - delta(y, 5) * delta(next(x, 5), 5)) > 0.5",
                    },
                    {
                        "name": "stop",
                        "description": "nearly at rest",
                        "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15",
                    },
                    {
                        "name": "hostile",
                        "description": "must be rejected",
                        "condition": "__import__('os').system('echo pwned')",
                    },
                ]
            }
        )
    )
    r = run_script(
        SCRIPT,
        *SMALL,
        "--dataset-path",
        pointmaze_npz,
        "--rules-path",
        rules,
        "--run-dir",
        tmp_path / "runs",
        "--num-seeds",
        "2",
        "--dataset-fraction",
        "0.5",
        timeout=400,
    )
    out = r.output
    assert "pwned" not in out and "rejected hostile" in out and "accepted turning_event" in out
    steps = [int(s) for s in re.findall(r"^step=(\d+) SPS=", out, re.M)]
    assert steps and max(steps) == 60, "no gradient step was logged"
    assert sum(float(k) for k in re.findall(r"frac_keystate_goals=([0-9.]+)", out)) > 0, (
        "no key-state goal sampled"
    )
    assert re.findall(r"^eval step=60 .*overall_success=([0-9.]+)", out, re.M), (
        "no evaluation happened"
    )
    run_dir = next((tmp_path / "runs").iterdir())
    assert [x["name"] for x in json.loads((run_dir / "rules.json").read_text())["rules"]] == [
        "turning_event",
        "stop",
    ]
    td = np.load(run_dir / "td_probe.npz")  # Figure 2 from the paired probe, both seeds
    assert (
        td["td"].shape[1:3] == (2, 4)
        and td["counts"].any()
        and td["gap_matched"].shape == (len(td["steps"]), 2)
        and np.isfinite(td["gap_matched"]).any()
    )
    assert (run_dir / "td_probe.png").stat().st_size > 0 and "__frac0.5__seed1x2__" in run_dir.name
    assert (run_dir / "params.msgpack").stat().st_size > 0
    final = json.loads((run_dir / "final_eval.json").read_text())
    assert 0.0 <= final["eval/overall_success"] <= 1.0 and len(final["per_seed"]) == 2
