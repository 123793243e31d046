"""Tests for keystate_gciql.py: rule compiler (valid + hostile), key-state sampling vs a slow loop, GCIQL losses vs a
hand computation, bad inputs, rule generation through a scripted OpenAI-compatible endpoint (good, malformed, hostile
answers, HTTP errors), and end-to-end smoke runs (rules file; real SmolLM2 relabeler, plumbing only) on a pointmaze
dataset built offline by tests/keystate_data.py."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from keystate_data import BAD_INPUTS, build_pointmaze, write_bad_inputs  # noqa: E402

SCRIPT = "keystate_gciql.py"
# Small but real: a tiny network keeps the smoke runs inside the CI budget; everything else is the script's default path.
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
    "--eval-interval",
    "0",
    "--eval-episodes",
    "1",
    "--adapt-interval",
    "10",
]


def load_script():
    spec = importlib.util.spec_from_file_location("keystate_gciql", REPO / SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ks():
    return load_script()


@pytest.fixture(scope="module")
def pointmaze_npz(tmp_path_factory):
    return build_pointmaze(
        tmp_path_factory.mktemp("pm") / "pointmaze-medium-navigate-v0.npz", episodes=12, episode_steps=201, seed=0
    )


def compact(obs, act, term):
    """A dataset as ogbench.load_dataset(compact_dataset=True) returns it."""
    return {
        "observations": obs,
        "actions": act,
        "terminals": np.minimum(term + np.append(term[1:], 1), 1),
        "valids": 1.0 - term,
    }


def pointmaze_dataset(ks, path):
    return ks.make_env_and_dataset(ks.Args(env_name="pointmaze-medium-navigate-v0", dataset_path=str(path)))[1]


def build_mask(ks, args, ds, folder, log):
    """build_keystate_mask on every row, then rules.json written into folder as main() writes it into the run folder."""
    mask, saved = ks.build_keystate_mask(args, ds, np.ones(len(ds["valids"]), bool), log)
    Path(folder).mkdir(parents=True, exist_ok=True)
    (Path(folder) / "rules.json").write_text(json.dumps(saved))
    return mask


def toy_features(ks):
    """Two episodes of 5 and 4 rows; x = row index, y = 10 * row index."""
    obs = np.stack([np.arange(9.0), 10 * np.arange(9.0)], 1).astype(np.float32)
    term = np.array([0, 0, 0, 0, 1, 0, 0, 0, 1], np.float32)
    ds = compact(obs, np.zeros((9, 2), np.float32), term)
    return ks.Features(ds, {"x": 0, "y": 1}), ds


# ---------------------------------------------------------------------------------------------------------------- help
def test_help(run_script):
    r = run_script(SCRIPT, "--help", timeout=60)
    assert all(f in r.output for f in ("--relabel", "--p-keystate", "--rules-path", "--num-seeds"))


# ------------------------------------------------------------------------------------------------------------ compiler
def test_compiler_accepts_valid_rules(ks):
    feats, ds = toy_features(ks)
    assert list(ks.Features(ds, {}).ep_end) == [4, 4, 4, 4, 4, 8, 8, 8, 8]
    # goals never go past an episode's last *valid* row, as OGBench's terminal_locs
    assert list(np.asarray(ks.make_goal_data(ds, None)["final_idxs"])) == [3, 3, 3, 3, 3, 7, 7, 7, 7]
    x = np.arange(9.0)
    # prev/next are clamped to the row's own episode (rows 0-4 and 5-8).
    prev2 = np.array([0, 0, 0, 1, 2, 5, 5, 5, 6], float)
    next1 = np.array([1, 2, 3, 4, 4, 6, 7, 8, 8], float)
    np.testing.assert_array_equal(ks.compile_condition("prev(x, 2) >= 0", feats), np.ones(9, bool))
    np.testing.assert_array_equal(ks.compile_condition("x - prev(x, 2) == 2", feats), x - prev2 == 2)
    np.testing.assert_array_equal(ks.compile_condition("delta(x, 2) == 2", feats), x - prev2 == 2)
    np.testing.assert_array_equal(ks.compile_condition("next(x, 1) > x", feats), next1 > x)
    # nested lags compose inside the episode: next(prev(x, 2), 1) at row i reads row clamp(clamp(i + 1) - 2)
    nested = np.array([0, 0, 1, 2, 2, 5, 5, 6, 6], float)
    np.testing.assert_array_equal(ks.compile_condition("next(prev(x, 2), 1) == s0 - 1", feats), nested == x - 1)
    np.testing.assert_array_equal(ks.compile_condition("norm(x, y) > 50", feats), np.sqrt(101) * x > 50)
    np.testing.assert_array_equal(
        ks.compile_condition("2 < x <= 6 and not y == 50", feats), (2 < x) & (x <= 6) & ~(10 * x == 50)
    )
    np.testing.assert_array_equal(
        ks.compile_condition("t == 0 or t_left == 0", feats), np.isin(np.arange(9), [0, 4, 5, 8])
    )
    np.testing.assert_array_equal(
        ks.compile_condition("abs(x - 4) ** 2 < 2 or max(x, 7) == x", feats), ((x - 4) ** 2 < 2) | (x >= 7)
    )


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('echo pwned') > 0",  # call of a non-whitelisted name
        "x.__class__ > 0",  # attribute access
        "().__class__.__bases__[0] > 0",
        "__builtins__ > 0",  # dunder name
        "_x > 0",
        "open('/etc/passwd') > 0",
        "eval('1') > 0",
        "x[0] > 0",  # subscript
        "[v for v in x] > 0",  # comprehension
        "(lambda: 1)() > 0",
        "x ** 1000 > 0",  # huge exponent
        "2 ** 10 ** 10 > 0",
        "x ** y > 0",  # non-constant exponent
        "'a' < 'b'",  # strings
        "prev(x, 1000) > 0",  # lag out of bounds
        "prev(x, y) > 0",  # lag not a literal
        "abs(x, y) > 0",  # wrong arity
        "sqrt(x=1) > 0",  # keywords
        "import os",  # statements do not parse as an expression
        "unknown_feature > 1",
        "x + 1",  # not boolean
        "(x := 3) > 0",  # walrus
        "x if x else y",
        "x > 0 " + "+ 1 " * 200,  # too long / too complex
        "... > 0",  # Ellipsis constant
        "x > 1" + "0" * 380,  # integer literal beyond float range
        "x>" + "9" * 396,  # the longest literal that fits the length bound: beyond float range
        "x > " + "1" * 400,  # a 400-digit literal (longer than any condition may be)
        "prev(next(x, 15), 10) > 0",  # nested lags beyond the temporal window
        "delta(" * 21 + "x" + ", 1)" * 21 + " > 0",  # nesting deeper than the window allows
        "x > 1e999",  # infinite literal
        "x > 1j",  # complex literal
        "(" * 250 + "x" + ")" * 250 + " > 0",  # nesting beyond the parser's limit (and the length bound)
        "x > 0 and y > 0 or f'{x}' > ''",
    ],
)
def test_compiler_rejects_hostile_rules(ks, expr, capfd):
    feats, _ = toy_features(ks)
    with pytest.raises(ks.RuleError):
        ks.compile_condition(expr, feats)
    assert "pwned" not in capfd.readouterr().out  # nothing was executed


def test_rule_json_extraction(ks):
    txt = 'Sure! ```json\n{"rules": [{"name": "a", "condition": "x > 1"}]}\n``` hope it helps'
    assert ks.extract_rules_json(txt) == [{"name": "a", "condition": "x > 1"}]
    assert (
        ks.extract_rules_json('noise {"bad": 1} then {"rules": [{"name": "b", "condition": "y < 2"}]}')[0]["name"]
        == "b"
    )
    # a truncated answer is a failed answer (a real relabeler finishes its JSON; nothing is salvaged)
    cut = '{"rules": [{"name": "a", "condition": "x > 1"}, {"name": "b", "description": "d", "condition": "y < 2", "na'
    for bad in ["no json here", '{"rules": "x > 1"}', "{" * 5000, cut]:
        with pytest.raises(ks.RuleError):
            ks.extract_rules_json(bad)


def test_compile_time_self_check_calibrates_fire_rate(ks, monkeypatch):
    feats, ds = toy_features(ks)
    monkeypatch.setattr(ks, "RULE_MIN_FIRE", 0.1)
    monkeypatch.setattr(ks, "RULE_MAX_FIRE", 0.5)
    rules = [
        {"name": "ok", "condition": "x >= 5"},
        {"name": "always", "condition": "x >= 0"},
        {"name": "never", "condition": "x > 100"},
        {"name": "broken", "condition": "x >"},
    ]
    key_mask = np.zeros(9, bool)
    good, bad = ks.check_rules(rules, feats, ds["valids"] > 0, key_mask)
    assert [g["name"] for g in good] == ["ok"] and good[0]["fire_rate"] == pytest.approx(3 / 7)
    # the accepted rule's mask went into the union; the records hold names, conditions and rates only (no masks)
    np.testing.assert_array_equal(key_mask, np.arange(9) >= 5)
    assert set(good[0]) == {"name", "description", "condition", "fire_rate"}
    reasons = {b["name"]: b["error"] for b in bad}
    assert "outside" in reasons["always"] and "outside" in reasons["never"] and "syntax" in reasons["broken"]


def test_compiler_speed_1m_states(ks):
    """Issue target: 1M states in under 2 s on CPU (here with a margin for the shared CI box)."""
    import time

    rng = np.random.default_rng(0)
    n = 1_000_000
    term = np.zeros(n, np.float32)
    term[999::1000] = 1
    ds = compact(rng.normal(size=(n, 2)).astype(np.float32), np.zeros((n, 2), np.float32), term)
    feats = ks.Features(ds, {"x": 0, "y": 1})
    t0 = time.time()
    mask = ks.compile_condition(
        "abs(delta(x, 5) * delta(next(y, 5), 5) - delta(y, 5) * delta(next(x, 5), 5)) > 0.5"
        " or norm(delta(x, 3), delta(y, 3)) < 0.15",
        feats,
    )
    seconds = time.time() - t0
    assert mask.shape == (n,) and 0 < mask.mean() < 1
    assert seconds < 4.0, f"1M states took {seconds:.2f}s"


def test_compiler_adversarial_nesting_is_linear_or_rejected(ks):
    """Issue 12: nested prev/next/delta at depth 20-30 on 100k rows finish well under a second (each sub-expression is
    computed once) or are rejected (the lags of nested temporal functions add up to at most MAX_LAG)."""
    import time

    rng = np.random.default_rng(0)
    n = 100_000
    term = np.zeros(n, np.float32)
    term[999::1000] = 1
    feats = ks.Features(
        compact(rng.normal(size=(n, 2)).astype(np.float32), np.zeros((n, 2), np.float32), term), {"x": 0, "y": 1}
    )
    for fn in ("prev", "next", "delta"):
        for depth in (20, 21, 26, 30):
            t0 = time.time()
            try:
                ks.compile_condition(f"{fn}(" * depth + "x + y" + ", 1)" * depth + " > 0", feats)
                accepted = True
            except ks.RuleError as e:
                accepted = False
                assert "nested lags may add up to 20" in str(e) or "too complex" in str(e)
            assert time.time() - t0 < 0.5, (fn, depth, time.time() - t0)
            assert accepted == (depth <= ks.MAX_LAG), (fn, depth)
    # a rule as wide as the node bound allows, every term a full window: still linear
    t0 = time.time()
    ks.compile_condition(" + ".join(["delta(delta(x, 10), 10)"] * 8) + " > 0", feats)
    assert time.time() - t0 < 0.5
    # nested temporal functions compose as shifts inside the episode
    toy, _ = toy_features(ks)
    x, prev1, prev2 = np.arange(9.0), np.array([0, 0, 1, 2, 3, 5, 5, 6, 7.0]), np.array([0, 0, 0, 1, 2, 5, 5, 5, 6.0])
    assert ks.compile_condition("prev(prev(x, 1), 1) == prev(x, 2)", toy).all()
    assert ks.compile_condition("next(prev(x, 3), 3) >= prev(x, 3)", toy).all()
    np.testing.assert_array_equal(ks.compile_condition("delta(delta(x, 1), 1) == 0", toy), x - 2 * prev1 + prev2 == 0)


def test_rule_cap_for_files_and_llm_answers(ks, scripted_llm, pointmaze_npz, tmp_path):
    """One cap (MAX_RULES) for a --rules-path file and for an LLM answer, with a message naming what was dropped."""
    ds = pointmaze_dataset(ks, pointmaze_npz)
    rules = tmp_path / "many.json"
    rules.write_text(json.dumps({"rules": [dict(STOP_RULE, name=f"r{i}") for i in range(10_000)]}))
    logs = []
    args = ks.Args(env_name="pointmaze-medium-navigate-v0", rules_path=str(rules))
    assert build_mask(ks, args, ds, tmp_path / "file", logs.append).any()
    assert "[rules] 9984 rules beyond the cap of 16 dropped: r16, r17, r18, r19, r20, ..." in logs
    assert len(json.loads((tmp_path / "file" / "rules.json").read_text())["rules"]) == 16
    scripted_llm.respond = lambda messages: json.dumps({"rules": [dict(STOP_RULE, name=f"a{i}") for i in range(20)]})
    args = ks.Args(env_name="pointmaze-medium-navigate-v0", llm_base_url=scripted_llm.base_url, llm_model="scripted")
    logs = []
    assert build_mask(ks, args, ds, tmp_path / "llm", logs.append).any()
    assert "[rules] 4 rules beyond the cap of 16 dropped: a16, a17, a18, a19, ..." in logs


# ------------------------------------------------------------------------------------------------------------ sampling
def slow_sample_goal(rng, idx, valid_idxs, final_idxs, key_set, p_cur, p_traj, discount, p_key, window):
    """The obvious per-sample loop: OGBench's mixture, future branch replaced by a key state w.p. p_key."""
    if rng.random() < p_cur:
        return idx, "cur"
    if rng.random() < p_traj / (1 - p_cur):
        final = final_idxs[idx]
        keys = [k for k in range(idx + 1, min(idx + window, final) + 1) if k in key_set]
        if keys and rng.random() < p_key:
            return keys[rng.integers(len(keys))], "key"
        return min(idx + rng.geometric(1 - discount), final), "her"
    return valid_idxs[rng.integers(len(valid_idxs))], "random"


def test_keystate_sampling_matches_slow_loop(ks):
    import jax
    import jax.numpy as jnp

    # 3 episodes of 40 rows; key states at a few rows of episodes 1 and 2 only.
    n_ep, ep_len = 3, 40
    term = np.zeros(n_ep * ep_len, np.float32)
    term[ep_len - 1 :: ep_len] = 1
    obs = np.arange(n_ep * ep_len, dtype=np.float32)[:, None]
    ds = compact(obs, np.zeros_like(obs), term)
    key_mask = np.zeros(len(obs), bool)
    key_mask[[5, 12, 13, 30, 38, 39, 50, 70]] = True
    data = ks.make_goal_data(ds, key_mask)
    valid_idxs, final_idxs = np.asarray(data["valid_idxs"]), np.asarray(data["final_idxs"])
    key_set = set(np.nonzero(key_mask & (ds["valids"] > 0))[0].tolist())  # row 39 is an episode's last row: no goal
    assert 39 not in key_set and final_idxs[10] == 38
    p_cur, p_traj, discount, p_key, window = 0.2, 0.5, 0.9, 0.7, 20
    n = 40_000
    sample = jax.jit(lambda k, i: ks.sample_goals(k, data, i, p_cur, p_traj, True, discount, p_key, window))
    slow_rng = np.random.default_rng(0)
    for idx in [3, 11, 29, 45, 90]:  # keys in window / several keys / window cut at episode end / none / none
        goals, is_key, is_her = map(np.asarray, sample(jax.random.PRNGKey(idx), jnp.full((n,), idx, jnp.int32)))
        slow = [
            slow_sample_goal(slow_rng, idx, valid_idxs, final_idxs, key_set, p_cur, p_traj, discount, p_key, window)
            for _ in range(n)
        ]
        slow_goals = np.array([g for g, _ in slow])
        fast_hist = np.bincount(goals, minlength=len(obs)) / n
        slow_hist = np.bincount(slow_goals, minlength=len(obs)) / n
        tv = 0.5 * np.abs(fast_hist - slow_hist).sum()
        assert tv < 0.03, (idx, tv)
        kinds = np.array([k for _, k in slow])
        assert abs(is_key.mean() - (kinds == "key").mean()) < 0.01, idx
        assert abs(is_her.mean() - (kinds == "her").mean()) < 0.01, idx
        assert set(goals[is_key].tolist()) <= key_set and (goals[is_key] > idx).all()
        assert (goals[is_key] <= min(idx + window, final_idxs[idx])).all()
    # no key state anywhere -> exactly OGBench's HER mixture (no key-state goal ever)
    data_none = ks.make_goal_data(ds, np.zeros(len(obs), bool))
    _, is_key, _ = ks.sample_goals(
        jax.random.PRNGKey(0), data_none, jnp.full((1000,), 3, jnp.int32), p_cur, p_traj, True, discount, 1.0, window
    )
    assert not np.asarray(is_key).any()


def test_batch_rewards_and_masks(ks):
    import jax

    n_ep, ep_len = 4, 30
    term = np.zeros(n_ep * ep_len, np.float32)
    term[ep_len - 1 :: ep_len] = 1
    obs = np.random.default_rng(0).normal(size=(n_ep * ep_len, 3)).astype(np.float32)
    ds = compact(obs, np.ones((len(obs), 2), np.float32), term)
    data = ks.make_goal_data(ds, None)
    args = ks.resolve_presets(ks.Args(env_name="pointmaze-medium-navigate-v0", batch_size=4096))
    b = ks.sample_batch(jax.random.PRNGKey(0), data, args, 0.0)
    same = np.all(np.asarray(b["value_goals"]) == np.asarray(b["observations"]), axis=1)
    np.testing.assert_array_equal(np.asarray(b["rewards"]), same.astype(np.float32) - 1.0)
    np.testing.assert_array_equal(np.asarray(b["masks"]), 1.0 - same)
    assert 0.17 < same.mean() < 0.3  # p_curgoal 0.2 plus the odd future goal that lands on t itself
    # next_observations are the following row of the same episode (never across an episode boundary)
    nxt = np.asarray(b["next_observations"])
    rows = np.array([np.nonzero((obs == o).all(1))[0][0] for o in np.asarray(b["observations"])[:200]])
    np.testing.assert_array_equal(nxt[:200], obs[rows + 1])
    assert not np.isin(rows, np.arange(ep_len - 1, len(obs), ep_len)).any()


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
                x = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(ln["scale"]) + np.asarray(ln["bias"])
    return x


def test_gciql_losses_match_hand_computation(ks):
    import jax

    args = ks.resolve_presets(ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(8, 8)))
    assert args.alpha == 0.003 and args.discount == 0.99
    ob_dim, act_dim, b = 3, 2, 6
    nets, tx, state = ks.make_agent(args, ob_dim, act_dim, jax.random.PRNGKey(0))
    rng = np.random.default_rng(1)
    batch = {
        k: rng.normal(size=(b, ob_dim)).astype(np.float32)
        for k in ["observations", "next_observations", "value_goals", "actor_goals"]
    }
    batch["actions"] = rng.uniform(-1, 1, size=(b, act_dim)).astype(np.float32)
    batch["masks"] = np.array([1, 1, 0, 1, 1, 0], np.float32)
    batch["rewards"] = batch["masks"] - 1.0
    p = jax.tree_util.tree_map(np.asarray, state.params)
    # perturb the target critic so that it differs from the online one
    target = jax.tree_util.tree_map(lambda a: np.asarray(a) + 0.1, p["critic"])

    def V(x, g):
        return np_mlp(p["value"]["MLP_0"], np.concatenate([x, g], 1), True, False)[:, 0]

    def Q(cp, x, g, a):
        inp = np.concatenate([x, g, a], 1)
        return [
            np_mlp(jax.tree_util.tree_map(lambda t: t[e], cp["VmapMLP_0"]), inp, True, False)[:, 0] for e in range(2)
        ]

    # value: expectile 0.9 regression of V towards min of the target critics
    q = np.minimum(*Q(target, batch["observations"], batch["value_goals"], batch["actions"]))
    diff = q - V(batch["observations"], batch["value_goals"])
    want_v = np.mean(np.where(diff >= 0, 0.9, 0.1) * diff**2)
    got_v, _ = ks.value_loss(state.params, target, batch, nets, 0.9)
    assert float(got_v) == pytest.approx(want_v, rel=1e-4)
    # critic: both heads regress to r + gamma * mask * V(s', g)
    y = batch["rewards"] + 0.99 * batch["masks"] * V(batch["next_observations"], batch["value_goals"])
    q1, q2 = Q(p["critic"], batch["observations"], batch["value_goals"], batch["actions"])
    want_c = np.mean((q1 - y) ** 2 + (q2 - y) ** 2)
    got_c, info = ks.critic_loss(state.params, batch, nets, 0.99)
    assert float(got_c) == pytest.approx(want_c, rel=1e-4)
    np.testing.assert_allclose(np.asarray(info["td_abs"]), np.abs(y - (q1 + q2) / 2), rtol=1e-4, atol=1e-6)
    # actor, DDPG+BC with constant unit std: -Q(s, g, clip(mu)) / mean|Q| - alpha * log N(a; mu, I)
    mu = np_mlp(p["actor"], np.concatenate([batch["observations"], batch["actor_goals"]], 1), False, False)
    qa = np.minimum(*Q(p["critic"], batch["observations"], batch["actor_goals"], np.clip(mu, -1, 1)))
    logp = np.sum(-0.5 * (batch["actions"] - mu) ** 2 - 0.5 * np.log(2 * np.pi), 1)
    want_a = -qa.mean() / (np.abs(qa).mean() + 1e-6) - (0.003 * logp).mean()
    got_a, _ = ks.actor_loss(state.params, batch, nets, 0.003)
    assert float(got_a) == pytest.approx(want_a, rel=1e-4)


def agents(ks, args, seeds, ob_dim=2, act_dim=2):
    """One agent per seed on a leading axis, as main() builds them."""
    import jax
    import jax.numpy as jnp

    nets, tx, _ = ks.make_agent(args, ob_dim, act_dim, jax.random.PRNGKey(0))
    keys = jnp.stack([jax.random.PRNGKey(s) for s in seeds])
    return nets, tx, jax.vmap(lambda k: ks.make_agent(args, ob_dim, act_dim, k)[2])(keys)


def test_update_soft_target_and_learning(ks):
    import jax
    import jax.numpy as jnp

    args = ks.resolve_presets(ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(16, 16), batch_size=32))
    n = 200
    term = np.zeros(n, np.float32)
    term[49::50] = 1
    obs = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    ds = compact(obs, np.zeros((n, 2), np.float32), term)
    data = ks.make_goal_data(ds, None, np.ones((1, n), bool))
    nets, tx, state = agents(ks, args, [0])
    update, probe = ks.make_update(args, nets, tx)
    old = jax.tree_util.tree_map(np.array, state)  # host copy: the update donates (reuses) the old state's buffers
    # target <- tau * critic(before the step) + (1 - tau) * target, as OGBench's gciql.py
    want = jax.tree_util.tree_map(lambda c, t: 0.005 * c + 0.995 * t, old.params["critic"], old.target)
    new, info = update(state, data, jnp.zeros(1))
    state = old
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.target, want)
    assert not np.allclose(
        new.params["value"]["MLP_0"]["Dense_0"]["kernel"], state.params["value"]["MLP_0"]["Dense_0"]["kernel"]
    )
    assert float(info["relabel/frac_keystate_goals"][0]) == 0  # HER arm: no key goals
    td, dist, counts = probe(new, data)  # no key state anywhere: no probe row counts
    assert td.shape == (1, 3, 32) and dist.shape == (1, 3, 32) and not np.asarray(counts).any()


def test_num_seeds_vmapped(ks, monkeypatch):
    """--num-seeds N: one jitted update for N agents (a loop inside the jit on CPU, vmapped on GPU). Seed index 0 of a 2-seed run computes the same first-step losses
    as a 1-seed run of that seed (same init, same batch); the two seeds' parameters and batches differ; each seed
    draws rows only from its own --dataset-fraction subset."""
    import jax
    import jax.numpy as jnp

    args = ks.resolve_presets(ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(16, 16), batch_size=64))
    n = 400
    term = np.zeros(n, np.float32)
    term[49::50] = 1
    obs = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    ds = compact(obs, np.random.default_rng(1).uniform(-1, 1, (n, 2)).astype(np.float32), term)
    key_mask = np.zeros(n, bool)
    key_mask[5::7] = True
    args.num_seeds, args.dataset_fraction = 2, 0.5
    keep = ks.episode_subsets(ds, args)
    assert keep.shape == (2, n) and (keep.sum(1) == 200).all() and not (keep[0] == keep[1]).all()
    args.num_seeds = 1
    np.testing.assert_array_equal(ks.episode_subsets(ds, args)[0], keep[0])  # seed 0's subset: the same alone
    losses = {}
    for seeds in ([0], [0, 1]):
        nets, tx, state = agents(ks, args, seeds)
        update, _ = ks.make_update(args, nets, tx)
        data = ks.make_goal_data(ds, key_mask, keep[: len(seeds)])
        p0 = jax.tree_util.tree_map(np.array, state.params)
        state, info = update(state, data, jnp.full(len(seeds), 0.5))
        losses[len(seeds)] = {k: np.asarray(v) for k, v in info.items()}
    kernel = p0["value"]["MLP_0"]["Dense_0"]["kernel"]
    assert not np.allclose(kernel[0], kernel[1])  # each seed its own initialisation
    for k in ("value/value_loss", "critic/critic_loss", "actor/actor_loss"):
        np.testing.assert_allclose(losses[2][k][0], losses[1][k][0], rtol=1e-5)
        assert losses[2][k][0] != losses[2][k][1]
    # on a GPU the seeds are vmapped instead of looped: the same numbers (up to float rounding)
    monkeypatch.setattr(ks.jax, "default_backend", lambda: "gpu")
    nets, tx, state = agents(ks, args, [0, 1])
    update, _ = ks.make_update(args, nets, tx)
    _, info = update(state, data, jnp.full(2, 0.5))
    for k in ("value/value_loss", "critic/critic_loss", "actor/actor_loss"):
        np.testing.assert_allclose(np.asarray(info[k]), losses[2][k], rtol=1e-4)
    # rows of each seed's batches come from its own episodes only
    args.batch_size = 4096
    b = jax.vmap(
        lambda k, d: ks.sample_batch(k, d, args, 0.0), in_axes=(0, {k: 0 if k in ks.PER_SEED else None for k in data})
    )(jax.random.split(jax.random.PRNGKey(0), 2), data)
    for i in range(2):
        rows = np.nonzero((np.asarray(b["observations"][i])[:, None] == obs[None]).all(-1))[1]
        assert keep[i][rows].all()


def test_relabel_check_converges(ks):
    """Relabel-time self-check on synthetic paired TD-difference streams (no training): key goals persistently harder
    -> p_keystate rises to its upper bound and stays; not harder -> falls and stays; constant input -> monotone (no
    reversal); a gap that falls as p rises (training on key goals lowers their TD: the feedback that made the old
    fixed-step rule oscillate) -> p settles near the fixed point with ever smaller moves."""
    rng = np.random.default_rng(0)
    args = ks.Args(num_seeds=1, p_keystate=0.5)

    def run(gap, decisions=300, n=256, noise=0.05):
        check, ps = ks.RelabelCheck(args, probing=True), []
        for _ in range(decisions):
            d = gap(check.p_keystate[0]) + noise * rng.standard_normal((1, n))
            check.adapt(d, np.ones((1, n), bool))
            ps.append(check.p_keystate[0])
        return np.array(ps)

    up, down = run(lambda p: 0.03), run(lambda p: -0.03)
    assert up[-1] == ks.P_KEYSTATE_MAX and (up[50:] == ks.P_KEYSTATE_MAX).all()
    assert down[-1] == ks.P_KEYSTATE_MIN and (down[100:] == ks.P_KEYSTATE_MIN).all()
    for const in (0.02, -0.02, 0.0):  # a constant stream (zero variance) never reverses direction
        moves = np.diff(run(lambda p: const, noise=0.0))
        assert (moves >= 0).all() or (moves <= 0).all(), const
    assert (run(lambda p: 0.0, noise=0.0) == 0.5).all()  # no difference: p stays where it is
    fb = run(lambda p: 0.02 * (0.3 - p), decisions=2000, noise=0.02)  # the gap is zero at p = 0.3
    assert abs(fb[-200:].mean() - 0.3) < 0.05 and np.abs(np.diff(fb[-200:])).max() < 0.01
    assert np.abs(np.diff(fb[:50])).max() > 5 * np.abs(np.diff(fb[-200:])).max()  # moves shrink
    # rows that do not count (no key state in the window) do not enter the test
    check = ks.RelabelCheck(args, probing=True)
    check.adapt(np.array([[1.0, -5.0, -5.0]]), np.array([[True, False, False]]))
    assert check.p_keystate[0] == 0.5  # one row: no decision


def test_probe_batch_is_paired_and_in_window(ks):
    """The probe's three goals share their row and lie in the same window (t, min(t + window, final)]; the key-state
    goal is a key state; rows without a key state in the window do not count."""
    import jax

    n_ep, ep_len = 4, 100
    term = np.zeros(n_ep * ep_len, np.float32)
    term[ep_len - 1 :: ep_len] = 1
    obs = np.arange(n_ep * ep_len, dtype=np.float32)[:, None]
    ds = compact(obs, np.zeros_like(obs), term)
    key_mask = np.zeros(len(obs), bool)
    key_mask[[20, 60, 150, 390]] = True
    data = ks.make_goal_data(ds, key_mask)
    args = ks.resolve_presets(ks.Args(env_name="pointmaze-medium-navigate-v0", batch_size=4096, keystate_window=30))
    batch, *out = ks.probe_batch(jax.random.PRNGKey(0), data, args)
    batch, (goals, dist, counts) = {k: np.asarray(v) for k, v in batch.items()}, map(np.asarray, out)
    t = batch["observations"][:, 0].astype(int)
    final = np.asarray(data["final_idxs"])[t]
    g = goals[..., 0].astype(int)  # (3, B) goal rows (observation = row index)
    np.testing.assert_array_equal(dist[1:], (g - t)[1:])  # (no key state: the key-state goal is a clipped sentinel)
    want = np.array([any(k in (20, 60, 150, 390) for k in range(i + 1, min(i + 30, f) + 1)) for i, f in zip(t, final)])
    np.testing.assert_array_equal(counts, want)
    assert np.isin(g[0][counts], [20, 60, 150, 390]).all() and (dist[0][counts] == (g - t)[0][counts]).all()
    assert ((g[:, counts] > t[counts]) & (g[:, counts] <= np.minimum(t + 30, final)[counts])).all()
    assert (batch["rewards"] == -1).all() and (batch["masks"] == 1).all()
    her, uni = dist[1][counts], dist[2][counts]
    assert her.mean() < uni.mean()  # geometric (discount 0.99) truncated to the window vs uniform over it


def test_run_folders_never_collide(ks, tmp_path, monkeypatch):
    """Issue 13 item 4: the run folder names the arm, the data fraction and the seeds, and two runs never share one,
    even when started in the same second by the same process."""
    import time

    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20260101-000000")  # the same second for every run
    args = ks.Args(env_name="pointmaze-medium-navigate-v0", run_dir=str(tmp_path / "runs"), relabel="her", seed=3)
    a, b = ks.make_run_dir(args), ks.make_run_dir(args)
    args.dataset_fraction, args.num_seeds = 0.5, 4
    c = ks.make_run_dir(args)
    assert len({a, b, c}) == 3 and all(p.is_dir() and p.parent == tmp_path / "runs" for p in (a, b, c))
    assert "__her__frac1__seed3x1__20260101-000000_" in a.name and "__frac0.5__seed3x4__" in c.name


# ----------------------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return write_bad_inputs(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_ends_in_one_error_line(run_script, pointmaze_npz, bad_files, tmp_path, case):
    """Issue 12, as a user sees it: a bad flag or data file ends in exactly one `error:` line naming the problem, exit
    status 2 (usage) or 1 (data), no traceback, and no run folder (the run fails before it would start)."""
    flags, status, named = BAD_INPUTS[case]
    rules, runs = tmp_path / "rules.json", tmp_path / "runs"
    rules.write_text(json.dumps({"rules": [STOP_RULE]}))
    flags = [f.format(**bad_files) for f in flags]
    r = run_script(
        SCRIPT,
        *SMALL,
        "--dataset-path",
        pointmaze_npz,
        "--rules-path",
        rules,
        "--run-dir",
        runs,
        *flags,
        check=False,
        timeout=120,
        env={"OMP_NUM_THREADS": "1"},
    )
    errors = [line for line in r.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(named, errors[0]) and r.returncode == status, r.output[-3000:]
    assert "Traceback" not in r.output and not runs.exists()


def test_bad_inputs_give_clear_errors(ks, pointmaze_npz, tmp_path, capsys):
    """The same checks in process: data errors are SystemExit("error: <file>: ..."), usage errors exit 2."""
    cases = [
        ({"obs": np.zeros((10, 2)), "actions": np.zeros((10, 2))}, "cannot read observations.*KeyError"),
        ({"observations": np.zeros((10, 3)), "actions": np.zeros((10, 2)), "terminals": np.ones(10)}, "shapes"),
        ({"observations": np.zeros((10, 2)), "actions": np.zeros((9, 2)), "terminals": np.ones(10)}, "shapes"),
        (
            {"observations": np.zeros((10, 2)), "actions": np.zeros((10, 2)), "terminals": np.zeros(10)},
            "the last row is not terminal",
        ),
    ]
    for i, (arrays, msg) in enumerate(cases):
        path = tmp_path / f"bad{i}.npz"
        np.savez(path, **arrays)
        with pytest.raises(SystemExit, match=f"error: {path}: .*{msg}"):
            pointmaze_dataset(ks, path)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(SystemExit, match="junk.npz: cannot read"):
        pointmaze_dataset(ks, tmp_path / "junk.npz")
    # a rules file that does not parse, or has the wrong shape: a data error naming the file
    ds = pointmaze_dataset(ks, pointmaze_npz)
    rules = tmp_path / "rules.json"
    for text in ["{'rules': [ this is not json", '{"rules": "x > 1"}']:
        rules.write_text(text)
        args = ks.Args(env_name="pointmaze-medium-navigate-v0", rules_path=str(rules))
        with pytest.raises(SystemExit, match=f"error: {rules}: no JSON object with a 'rules' list"):
            build_mask(ks, args, ds, tmp_path / "run", print)
    assert not (tmp_path / "run").exists()  # the run folder appears only once the rules are ready
    # an LLM endpoint that does not answer: a clear error at start, not a hang or a deep traceback
    args = ks.Args(llm_backend="openai", llm_base_url="http://127.0.0.1:9/v1", llm_timeout=2)
    with pytest.raises(SystemExit, match="no OpenAI-compatible server answers"):
        ks.LLMClient(args)
    # usage errors: one line naming the flag, exit status 2, before anything heavy
    usage = [(lambda: ks.read_layout(ks.Args(env_name="scene-play-v0")), "no prompts/keystate/layout_")]
    for kw, msg in [
        ({"dataset_fraction": 0.0}, "--dataset-fraction: must be in"),
        ({"p_keystate": 1.5}, "--p-keystate: must be in"),
        ({"batch_size": 0}, "--batch-size: must be >= 1"),
        ({"hidden_dims": ()}, "--hidden-dims"),
        ({"discount": 1.0}, "--discount"),
        ({"adapt_interval": -1}, "--adapt-interval: must be >= 0"),
        ({"rules_path": str(tmp_path / "nope.json")}, "--rules-path: must be an existing file"),
    ]:
        usage.append((lambda kw=kw: ks.check_args(ks.Args(**kw)), msg))
    for call, msg in usage:
        with pytest.raises(SystemExit) as e:
            call()
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1


# --------------------------------------------------------------------------------------------------------- smoke runs
def check_smoke_output(out: str, run_root: Path, expect_keystate: bool = True):
    steps = [int(s) for s in re.findall(r"^step=(\d+) SPS=", out, re.M)]
    assert steps and max(steps) >= 1, "no gradient step was logged"
    evals = re.findall(r"^eval step=\d+ .*overall_success=([0-9.]+)", out, re.M)
    assert evals, "no evaluation happened"
    key_goals = [float(k) for k in re.findall(r"frac_keystate_goals=([0-9.]+)", out)]
    if expect_keystate:
        assert sum(key_goals) > 0, "no key-state goal was sampled"
    run_dir = next(run_root.iterdir())
    saved = json.loads((run_dir / "rules.json").read_text())
    if expect_keystate:  # Figure 2: the paired probe, with its fields, and the PNG
        td = np.load(run_dir / "td_probe.npz")
        steps, n_seeds = len(td["steps"]), td["td"].shape[1]
        assert td["td"].shape[:3] == (steps, n_seeds, 3) and td["counts"].any() and list(td["kinds"])[1] == "her"
        for f in ("gap_her_mean", "gap_uniform_mean", "gap_her_ci", "gap_uniform_ci", "dist_mean"):
            assert len(td[f]) == steps and np.isfinite(td[f]).all(), f
        assert (td["gap_her_ci"][:, 0] <= td["gap_her_mean"]).all() and (
            td["gap_her_mean"] <= td["gap_her_ci"][:, 1]
        ).all()
        assert (run_dir / "td_probe.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return saved, run_dir


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
        timeout=400,
    )
    assert "pwned" not in r.output and "rejected hostile" in r.output and "1 rejected" in r.output
    saved, run_dir = check_smoke_output(r.output, tmp_path / "runs")
    assert [x["name"] for x in saved["rules"]] == ["turning_event", "stop"]  # saved with the run (--rules-path)
    assert "accepted turning_event" in r.output and re.search(r"p_keystate=[0-9.]+,[0-9.]+$", r.output, re.M)
    final = json.loads((run_dir / "final_eval.json").read_text())  # per seed, and the mean and CI over seeds
    assert final["seeds"] == [0, 1] and len(final["per_seed"]) == 2 and "eval/overall_success_ci95" in final
    assert final["eval/overall_success"] == pytest.approx(
        np.mean([r["eval/overall_success"] for r in final["per_seed"]])
    )
    assert np.load(run_dir / "td_probe.npz")["td"].shape[1] == 2 and "seed0x2__" in run_dir.name
    assert (run_dir / "params.msgpack").stat().st_size > 0


def test_smoke_with_smollm2_relabeler(run_script, pointmaze_npz, smollm2_dir, tmp_path):
    """Plumbing only: the real SmolLM2-135M-Instruct (in process) gets the rule prompt and answers; whatever it writes
    goes through the compiler and the self-check, and the run trains and evaluates (a weak model's rules may all be
    rejected: then HER). Relabeling semantics are tested with the scripted endpoint below."""
    r = run_script(
        SCRIPT,
        *SMALL,
        "--dataset-path",
        pointmaze_npz,
        "--llm-backend",
        "transformers",
        "--llm-model",
        smollm2_dir,
        "--llm-max-new-tokens",
        "120",
        "--run-dir",
        tmp_path / "runs",
        timeout=480,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert "[rules] LLM round 0 answered" in r.output and "failed LLM calls" in r.output
    saved, _ = check_smoke_output(r.output, tmp_path / "runs", expect_keystate=False)
    assert saved["llm_failures"] == 0 and all(0.001 <= x["fire_rate"] <= 0.3 for x in saved["rules"])


STOP_RULE = {"name": "stop", "description": "nearly at rest", "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15"}


def test_rule_generation_through_scripted_endpoint(run_script, scripted_llm, pointmaze_npz, tmp_path):
    """Round 0: a malformed answer -> the repair prompt. Round 1: a good rule and two hostile ones (code, a literal
    beyond float range) -> the good one is compiled and used, the hostile ones rejected and counted."""
    hostile = [
        {"name": "pwn", "condition": "__import__('os').system('echo pwned') > 0"},
        {"name": "huge", "condition": "x > 1" + "0" * 380},
    ]

    def respond(messages):
        if len(scripted_llm.requests) == 1:
            return "Here are the rules: x > 1 and y < 2 (sorry, no JSON)"
        return "```json\n" + json.dumps({"rules": [STOP_RULE, *hostile]}) + "\n```"

    scripted_llm.respond = respond
    r = run_script(
        SCRIPT,
        *SMALL,
        "--dataset-path",
        pointmaze_npz,
        "--llm-backend",
        "openai",
        "--llm-base-url",
        scripted_llm.base_url,
        "--llm-model",
        "scripted",
        "--num-rules",
        "1",
        "--run-dir",
        tmp_path / "runs",
        timeout=180,
    )
    out = r.output
    assert len(scripted_llm.requests) == 2 and "Traceback" not in out
    assert not re.search(r"^pwned$", out, re.M)  # the answer is logged, but nothing in it was executed
    assert "(whole answer)" in out and "x > 1 and y < 2" in scripted_llm.requests[1][0]["content"]  # repair prompt
    assert "rejected pwn" in out and "rejected huge" in out and "accepted stop" in out
    saved, _ = check_smoke_output(out, tmp_path / "runs")  # key-state goals were sampled: the rule is used
    assert [x["name"] for x in saved["rules"]] == ["stop"]
    assert saved["rejected_rules"] == 3 and saved["llm_failures"] == 0  # the malformed answer + two hostile rules


def test_llm_http_errors_fall_back_to_her(ks, scripted_llm, pointmaze_npz, tmp_path):
    """HTTP 500 on every request: each round is a counted failure (after the client's retries), and key-state
    relabeling falls back to HER with a warning instead of stopping the run."""
    scripted_llm.respond = lambda messages: 500
    args = ks.Args(
        env_name="pointmaze-medium-navigate-v0",
        llm_backend="openai",
        llm_base_url=scripted_llm.base_url,
        llm_model="scripted",
        llm_timeout=10,
    )
    ds = pointmaze_dataset(ks, pointmaze_npz)
    logs = []
    assert build_mask(ks, args, ds, tmp_path, logs.append) is None
    assert sum("failed (no answer)" in m for m in logs) == 3 and any("falling back to HER" in m for m in logs)
    saved = json.loads((tmp_path / "rules.json").read_text())
    assert saved["llm_failures"] == 3 and saved["rules"] == []
    assert len(scripted_llm.requests) == 9  # 1 + MAX_REPAIR_ROUNDS rounds, each the request and its two retries


def test_no_valid_rule_falls_back_to_her(ks, pointmaze_npz, tmp_path):
    """Compile-time self-check with nothing valid left: logged rejections, a warning, and no key-state mask (HER)."""
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            {"rules": [{"name": "always", "condition": "x > -1000"}, {"name": "attr", "condition": "x.real > 0"}]}
        )
    )
    args = ks.Args(env_name="pointmaze-medium-navigate-v0", rules_path=str(rules))
    ds = pointmaze_dataset(ks, pointmaze_npz)
    logs = []
    mask = build_mask(ks, args, ds, tmp_path, logs.append)
    assert mask is None
    assert any("rejected always" in m and "outside" in m for m in logs)
    assert any("rejected attr" in m for m in logs) and any("falling back to HER" in m for m in logs)
    assert json.loads((tmp_path / "rules.json").read_text())["rules"] == []
    # with no mask, the sampler never produces a key-state goal
    import jax

    data = ks.make_goal_data(ds, mask)
    b = ks.sample_batch(jax.random.PRNGKey(0), data, ks.resolve_presets(ks.Args(batch_size=512)), 1.0)
    assert not np.asarray(b["value_goal_is_key"]).any()


def test_saved_rules_roundtrip(ks, pointmaze_npz, tmp_path):
    """The rule set saved with a run can be passed back with --rules-path and gives the same key states."""
    rules = tmp_path / "in.json"
    rules.write_text(
        json.dumps(
            {"rules": [{"name": "stop", "description": "rest", "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15"}]}
        )
    )
    ds = pointmaze_dataset(ks, pointmaze_npz)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    args = ks.Args(env_name="pointmaze-medium-navigate-v0", rules_path=str(rules))
    mask_a = build_mask(ks, args, ds, tmp_path / "a", lambda m: None)
    args.rules_path = str(tmp_path / "a" / "rules.json")
    mask_b = build_mask(ks, args, ds, tmp_path / "b", lambda m: None)
    rules_b = json.loads((tmp_path / "b" / "rules.json").read_text())["rules"]
    assert mask_a is not None and mask_a.any() and np.array_equal(mask_a, mask_b)
    assert rules_b[0]["name"] == "stop" and 0.001 <= rules_b[0]["fire_rate"] <= 0.3


def test_layout_descriptions_match_environments(ks, tmp_path):
    """The feature -> state-dimension maps in prompts/keystate/layout_*.md agree with the real observations."""
    import ogbench
    from keystate_data import build_cube_single

    def layout(env_name):
        return ks.read_layout(ks.Args(env_name=env_name))[1]

    # pointmaze: (x, y) is the point's position
    env = ogbench.make_env_and_datasets("pointmaze-medium-navigate-v0", env_only=True)
    ob, _ = env.reset(seed=0, options=dict(task_id=1))
    f = layout("pointmaze-medium-navigate-v0")
    np.testing.assert_allclose(ob[[f["x"], f["y"]]], env.unwrapped.get_xy(), atol=1e-5)
    giant = ks.read_layout(ks.Args(env_name="pointmaze-giant-stitch-v0"))
    assert giant == ks.read_layout(ks.Args(env_name="pointmaze-medium-navigate-v0"))  # one layout per env family
    # antmaze: torso x, y, unit quaternion
    env = ogbench.make_env_and_datasets("antmaze-large-navigate-v0", env_only=True)
    ob, _ = env.reset(seed=0, options=dict(task_id=1))
    f = layout("antmaze-large-navigate-v0")
    assert ob.shape == (29,) and max(f.values()) < 29
    np.testing.assert_allclose(ob[[f["x"], f["y"]]], env.unwrapped.get_xy(), atol=1e-5)
    for _ in range(3):  # reset noise leaves the quaternion unnormalised; MuJoCo normalises it on the first step
        ob, *_ = env.step(env.action_space.sample())
    assert np.linalg.norm(ob[[f["qw"], f["qx"], f["qy"], f["qz"]]]) == pytest.approx(1, abs=1e-3)
    np.testing.assert_allclose(
        ob[[f[k] for k in ("vx", "vy", "vz", "wx", "wy", "wz")]], env.unwrapped.data.qvel[:6], atol=1e-5
    )
    # cube-single: a short oracle episode (OGBench's CubePlanOracle); cube starts resting on the table
    path = build_cube_single(tmp_path / "cube-single-play-v0.npz", episodes=1, episode_steps=60, val_episodes=0)
    obs = np.load(path)["observations"]
    f = layout("cube-single-play-v0")
    assert obs.shape[1] == 28 and max(f.values()) < 28
    assert 0.15 < obs[0, f["cube_z"]] < 0.25
    np.testing.assert_allclose(
        np.linalg.norm(obs[:, [f["cube_qw"], f["cube_qx"], f["cube_qy"], f["cube_qz"]]], axis=1), 1, atol=1e-3
    )
    np.testing.assert_allclose(obs[:, f["ee_cos_yaw"]] ** 2 + obs[:, f["ee_sin_yaw"]] ** 2, 1, atol=1e-3)
    np.testing.assert_allclose(obs[:, f["cube_cos_yaw"]] ** 2 + obs[:, f["cube_sin_yaw"]] ** 2, 1, atol=1e-3)
    assert np.all((obs[:, f["grip_contact"]] >= 0) & (obs[:, f["grip_contact"]] <= 1))
