"""Unit tests of keystate_gciql.py: rule compiler (valid + hostile, its cost as counts), key-state sampling vs a slow
loop, GCIQL losses vs a hand computation, in-process bad inputs. Elsewhere: the relabel-time self-check of both
key-state scripts (tests/test_keystate_selfcheck.py), end to end (tests/test_keystate_gciql_e2e.py), the bad-input
table (tests/test_bad_inputs.py)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

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
    "--eval-every",
    "0",
    "--eval-episodes",
    "1",
    "--adapt-interval",
    "10",
]

STOP_RULE = {
    "name": "stop",
    "description": "nearly at rest",
    "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15",
}


def load_script():
    spec = importlib.util.spec_from_file_location("keystate_gciql", REPO / SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ks():
    return load_script()


def compact(obs, act, term):
    """A dataset as ogbench.load_dataset(compact_dataset=True) returns it."""
    return {
        "observations": obs,
        "actions": act,
        "terminals": np.minimum(term + np.append(term[1:], 1), 1),
        "valids": 1.0 - term,
    }


def pointmaze_dataset(ks, path):
    return ks.make_env_and_dataset(
        ks.Args(env_name="pointmaze-medium-navigate-v0", dataset_path=str(path))
    )[1]


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
    assert list(np.asarray(ks.make_goal_data(ds, None)["final_idxs"])) == [
        3,
        3,
        3,
        3,
        3,
        7,
        7,
        7,
        7,
    ]
    x = np.arange(9.0)
    # prev/next are clamped to the row's own episode (rows 0-4 and 5-8).
    prev2 = np.array([0, 0, 0, 1, 2, 5, 5, 5, 6], float)
    next1 = np.array([1, 2, 3, 4, 4, 6, 7, 8, 8], float)
    np.testing.assert_array_equal(ks.compile_condition("prev(x, 2) >= 0", feats), np.ones(9, bool))
    np.testing.assert_array_equal(
        ks.compile_condition("x - prev(x, 2) == 2", feats), x - prev2 == 2
    )
    np.testing.assert_array_equal(ks.compile_condition("delta(x, 2) == 2", feats), x - prev2 == 2)
    np.testing.assert_array_equal(ks.compile_condition("next(x, 1) > x", feats), next1 > x)
    # nested lags compose inside the episode: next(prev(x, 2), 1) at row i reads row clamp(clamp(i + 1) - 2)
    nested = np.array([0, 0, 1, 2, 2, 5, 5, 6, 6], float)
    np.testing.assert_array_equal(
        ks.compile_condition("next(prev(x, 2), 1) == s0 - 1", feats), nested == x - 1
    )
    np.testing.assert_array_equal(
        ks.compile_condition("norm(x, y) > 50", feats), np.sqrt(101) * x > 50
    )
    np.testing.assert_array_equal(
        ks.compile_condition("2 < x <= 6 and not y == 50", feats),
        (2 < x) & (x <= 6) & ~(10 * x == 50),
    )
    np.testing.assert_array_equal(
        ks.compile_condition("t == 0 or t_left == 0", feats), np.isin(np.arange(9), [0, 4, 5, 8])
    )
    np.testing.assert_array_equal(
        ks.compile_condition("abs(x - 4) ** 2 < 2 or max(x, 7) == x", feats),
        ((x - 4) ** 2 < 2) | (x >= 7),
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
        "(" * 250
        + "x"
        + ")" * 250
        + " > 0",  # nesting beyond the parser's limit (and the length bound)
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
        ks.extract_rules_json(
            'noise {"bad": 1} then {"rules": [{"name": "b", "condition": "y < 2"}]}'
        )[0]["name"]
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
    assert (
        "outside" in reasons["always"]
        and "outside" in reasons["never"]
        and "syntax" in reasons["broken"]
    )


class CountedColumns(dict):
    """Features.columns that counts how often the compiler reads a feature column: a rule whose sub-expressions were
    recomputed (e.g. delta(x, k) as x - prev(x, k) evaluated twice) reads its columns exponentially often in the
    nesting depth; the compiler computes each sub-expression once, so it reads each column once per occurrence."""

    reads = 0

    def __getitem__(self, key):
        CountedColumns.reads += 1
        return super().__getitem__(key)


def count_reads(ks, expr: str, feats) -> int:
    feats.columns = CountedColumns(feats.columns)
    CountedColumns.reads = 0
    ks.compile_condition(expr, feats)
    return CountedColumns.reads


def feature_names(ks, expr: str, feats) -> int:
    """How many times the rule's text names a feature (the reads a linear evaluator makes)."""
    import ast

    return sum(
        isinstance(n, ast.Name) and n.id in feats.columns
        for n in ast.walk(ast.parse(expr, mode="eval"))
    )


def test_compiler_1m_states_reads_each_feature_once(ks):
    """A rule over 1M states (the paper's scale target; its time is measured in tests/benchmarks/
    bench_keystate_compiler.py) compiles to a mask, reading each feature column once per occurrence in the rule."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    term = np.zeros(n, np.float32)
    term[999::1000] = 1
    ds = compact(rng.normal(size=(n, 2)).astype(np.float32), np.zeros((n, 2), np.float32), term)
    feats = ks.Features(ds, {"x": 0, "y": 1})
    expr = (
        "abs(delta(x, 5) * delta(next(y, 5), 5) - delta(y, 5) * delta(next(x, 5), 5)) > 0.5"
        " or norm(delta(x, 3), delta(y, 3)) < 0.15"
    )
    assert count_reads(ks, expr, feats) == feature_names(ks, expr, feats) == 6
    mask = ks.compile_condition(expr, feats)
    assert mask.shape == (n,) and 0 < mask.mean() < 1


def test_compiler_adversarial_nesting_is_linear_or_rejected(ks):
    """Issue 12: nested prev/next/delta at depth 20-30 on 100k rows read each feature once per occurrence (each
    sub-expression is computed once: at depth 20 a recomputing evaluator reads 2^20 times) or are rejected (the lags of
    nested temporal functions add up to at most MAX_LAG)."""
    rng = np.random.default_rng(0)
    n = 100_000
    term = np.zeros(n, np.float32)
    term[999::1000] = 1
    feats = ks.Features(
        compact(rng.normal(size=(n, 2)).astype(np.float32), np.zeros((n, 2), np.float32), term),
        {"x": 0, "y": 1},
    )
    for fn in ("prev", "next", "delta"):
        for depth in (20, 21, 26, 30):
            expr = f"{fn}(" * depth + "x + y" + ", 1)" * depth + " > 0"
            try:
                reads = count_reads(ks, expr, feats)
                accepted = True
            except ks.RuleError as e:
                accepted = False
                assert "nested lags may add up to 20" in str(e) or "too complex" in str(e)
            assert accepted == (depth <= ks.MAX_LAG), (fn, depth)
            if accepted:
                assert reads == 2, (fn, depth, reads)
    # a rule as wide as the node bound allows, every term a full window: still one read per occurrence
    wide = " + ".join(["delta(delta(x, 10), 10)"] * 8) + " > 0"
    assert count_reads(ks, wide, feats) == 8
    # nested temporal functions compose as shifts inside the episode
    toy, _ = toy_features(ks)
    x, prev1, prev2 = (
        np.arange(9.0),
        np.array([0, 0, 1, 2, 3, 5, 5, 6, 7.0]),
        np.array([0, 0, 0, 1, 2, 5, 5, 5, 6.0]),
    )
    assert ks.compile_condition("prev(prev(x, 1), 1) == prev(x, 2)", toy).all()
    assert ks.compile_condition("next(prev(x, 3), 3) >= prev(x, 3)", toy).all()
    np.testing.assert_array_equal(
        ks.compile_condition("delta(delta(x, 1), 1) == 0", toy), x - 2 * prev1 + prev2 == 0
    )


def test_rule_cap_for_files_and_llm_answers(ks, scripted_llm, pointmaze_npz, tmp_path):
    """One cap (MAX_RULES) for a --rules-path file and for an LLM answer, with a message saying how many were dropped."""
    ds = pointmaze_dataset(ks, pointmaze_npz)
    rules = tmp_path / "many.json"
    rules.write_text(json.dumps({"rules": [dict(STOP_RULE, name=f"r{i}") for i in range(10_000)]}))
    logs = []
    args = ks.Args(env_name="pointmaze-medium-navigate-v0", rules_path=str(rules))
    assert build_mask(ks, args, ds, tmp_path / "file", logs.append).any()
    assert "[rules] 9984 rules beyond the cap of 16 dropped" in logs
    assert len(json.loads((tmp_path / "file" / "rules.json").read_text())["rules"]) == 16
    scripted_llm.respond = lambda messages: json.dumps(
        {"rules": [dict(STOP_RULE, name=f"a{i}") for i in range(20)]}
    )
    args = ks.Args(
        env_name="pointmaze-medium-navigate-v0",
        llm_base_url=scripted_llm.base_url,
        llm_model="scripted",
    )
    logs = []
    assert build_mask(ks, args, ds, tmp_path / "llm", logs.append).any()
    assert "[rules] 4 rules beyond the cap of 16 dropped" in logs


# ------------------------------------------------------------------------------------------------------------ sampling
def slow_sample_goal(
    rng, idx, valid_idxs, final_idxs, key_set, p_cur, p_traj, discount, p_key, window
):
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
    key_set = set(
        np.nonzero(key_mask & (ds["valids"] > 0))[0].tolist()
    )  # row 39 is an episode's last row: no goal
    assert 39 not in key_set and final_idxs[10] == 38
    p_cur, p_traj, discount, p_key, window = 0.2, 0.5, 0.9, 0.7, 20
    n = 40_000
    sample = jax.jit(
        lambda k, i: ks.sample_goals(
            k, data, i, discount, p_key, window, p_cur=p_cur, p_traj=p_traj, geometric=True
        )
    )
    slow_rng = np.random.default_rng(0)
    for idx in [
        3,
        11,
        29,
        45,
        90,
    ]:  # keys in window / several keys / window cut at episode end / none / none
        goals, is_key, is_her = map(
            np.asarray, sample(jax.random.PRNGKey(idx), jnp.full((n,), idx, jnp.int32))
        )
        slow = [
            slow_sample_goal(
                slow_rng,
                idx,
                valid_idxs,
                final_idxs,
                key_set,
                p_cur,
                p_traj,
                discount,
                p_key,
                window,
            )
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
        jax.random.PRNGKey(0),
        data_none,
        jnp.full((1000,), 3, jnp.int32),
        discount,
        1.0,
        window,
        p_cur=p_cur,
        p_traj=p_traj,
        geometric=True,
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
    rows = np.array(
        [np.nonzero((obs == o).all(1))[0][0] for o in np.asarray(b["observations"])[:200]]
    )
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
                x = (x - mu) / np.sqrt(var + 1e-6) * np.asarray(ln["scale"]) + np.asarray(
                    ln["bias"]
                )
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
            np_mlp(jax.tree_util.tree_map(lambda t: t[e], cp["VmapMLP_0"]), inp, True, False)[:, 0]
            for e in range(2)
        ]

    # value: expectile 0.9 regression of V towards min of the target critics
    q = np.minimum(*Q(target, batch["observations"], batch["value_goals"], batch["actions"]))
    diff = q - V(batch["observations"], batch["value_goals"])
    want_v = np.mean(np.where(diff >= 0, 0.9, 0.1) * diff**2)
    got_v, _ = ks.value_loss(state.params, target, batch, nets, 0.9)
    assert float(got_v) == pytest.approx(want_v, rel=1e-4)
    # critic: both heads regress to r + gamma * mask * V(s', g)
    y = batch["rewards"] + 0.99 * batch["masks"] * V(
        batch["next_observations"], batch["value_goals"]
    )
    q1, q2 = Q(p["critic"], batch["observations"], batch["value_goals"], batch["actions"])
    want_c = np.mean((q1 - y) ** 2 + (q2 - y) ** 2)
    got_c, info = ks.critic_loss(state.params, batch, nets, 0.99)
    assert float(got_c) == pytest.approx(want_c, rel=1e-4)
    np.testing.assert_allclose(
        np.asarray(info["td_abs"]), np.abs(y - (q1 + q2) / 2), rtol=1e-4, atol=1e-6
    )
    # actor, DDPG+BC with constant unit std: -Q(s, g, clip(mu)) / mean|Q| - alpha * log N(a; mu, I)
    mu = np_mlp(
        p["actor"], np.concatenate([batch["observations"], batch["actor_goals"]], 1), False, False
    )
    qa = np.minimum(
        *Q(p["critic"], batch["observations"], batch["actor_goals"], np.clip(mu, -1, 1))
    )
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

    args = ks.resolve_presets(
        ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(16, 16), batch_size=32)
    )
    n = 200
    term = np.zeros(n, np.float32)
    term[49::50] = 1
    obs = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    ds = compact(obs, np.zeros((n, 2), np.float32), term)
    data = ks.make_goal_data(ds, None, np.ones((1, n), bool))
    nets, tx, state = agents(ks, args, [0])
    update, probe = ks.make_update(args, nets, tx)
    old = jax.tree_util.tree_map(
        np.array, state
    )  # host copy: the update donates (reuses) the old state's buffers
    # target <- tau * critic(before the step) + (1 - tau) * target, as OGBench's gciql.py
    want = jax.tree_util.tree_map(
        lambda c, t: 0.005 * c + 0.995 * t, old.params["critic"], old.target
    )
    new, info = update(state, data, jnp.zeros(1))
    state = old
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), new.target, want
    )
    assert not np.allclose(
        new.params["value"]["MLP_0"]["Dense_0"]["kernel"],
        state.params["value"]["MLP_0"]["Dense_0"]["kernel"],
    )
    assert float(info["relabel/frac_keystate_goals"][0, 0]) == 0  # HER arm: no key goals
    td, dist, counts = probe(new, data)  # no key state anywhere: no probe row counts
    assert td.shape == (1, 4, 32) and dist.shape == (1, 4, 32) and not np.asarray(counts).any()


def test_num_seeds_vmapped(ks):
    """--num-seeds N: one jitted update for N agents (a loop inside the jit on CPU, vmapped on GPU). Seed index 0 of a 2-seed run computes the same first-step losses
    as a 1-seed run of that seed (same init, same batch); the two seeds' parameters and batches differ; each seed
    draws rows only from its own --dataset-fraction subset."""
    import jax
    import jax.numpy as jnp

    args = ks.resolve_presets(
        ks.Args(env_name="pointmaze-medium-navigate-v0", hidden_dims=(16, 16), batch_size=64)
    )
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
    np.testing.assert_array_equal(
        ks.episode_subsets(ds, args)[0], keep[0]
    )  # seed 0's subset: the same alone
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
    # the GPU branch (vmap): tests/test_keystate_selfcheck.py::test_over_seeds_branches_in_the_traced_update
    # rows of each seed's batches come from its own episodes only
    args.batch_size = 4096
    b = jax.vmap(
        lambda k, d: ks.sample_batch(k, d, args, 0.0),
        in_axes=(0, {k: 0 if k in ks.PER_SEED else None for k in data}),
    )(jax.random.split(jax.random.PRNGKey(0), 2), data)
    for i in range(2):
        rows = np.nonzero((np.asarray(b["observations"][i])[:, None] == obs[None]).all(-1))[1]
        assert keep[i][rows].all()


def test_run_folders_never_collide(ks, tmp_path, monkeypatch):
    """Issue 13 item 4: the run folder names the arm, the data fraction and the seeds, and two runs never share one,
    even when started in the same second by the same process."""
    import time

    monkeypatch.setattr(
        time, "strftime", lambda fmt, *a: "20260101-000000"
    )  # the same second for every run
    args = ks.Args(
        env_name="pointmaze-medium-navigate-v0",
        run_dir=str(tmp_path / "runs"),
        relabel="her",
        seed=3,
    )
    a, b = ks.make_run_dir(args), ks.make_run_dir(args)
    args.dataset_fraction, args.num_seeds = 0.5, 4
    c = ks.make_run_dir(args)
    assert len({a, b, c}) == 3 and all(
        p.is_dir() and p.parent == tmp_path / "runs" for p in (a, b, c)
    )
    assert "__her__frac1__seed3x1__20260101-000000_" in a.name and "__frac0.5__seed3x4__" in c.name


# ----------------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_give_clear_errors(ks, pointmaze_npz, tmp_path, capsys):
    """The same checks in process: data errors are SystemExit("error: <file>: ..."), usage errors exit 2."""
    cases = [
        (
            {"obs": np.zeros((10, 2)), "actions": np.zeros((10, 2))},
            "cannot read observations.*KeyError",
        ),
        (
            {
                "observations": np.zeros((10, 3)),
                "actions": np.zeros((10, 2)),
                "terminals": np.ones(10),
            },
            "shapes",
        ),
        (
            {
                "observations": np.zeros((10, 2)),
                "actions": np.zeros((9, 2)),
                "terminals": np.ones(10),
            },
            "shapes",
        ),
        (
            {
                "observations": np.zeros((10, 2)),
                "actions": np.zeros((10, 2)),
                "terminals": np.zeros(10),
            },
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
    usage = [
        (lambda: ks.read_layout(ks.Args(env_name="scene-play-v0")), "no prompts/keystate/layout_")
    ]
    for kw, msg in [
        ({"dataset_fraction": 0.0}, "--dataset-fraction: must be in"),
        ({"p_keystate": 1.5}, "--p-keystate: must be in"),
        ({"batch_size": 0}, "--batch-size: must be in [1, 65536], got 0"),
        ({"hidden_dims": (64, 0)}, "--hidden-dims: must be in [1, 16384], got (64, 0)"),
        ({"discount": 1.0}, "--discount"),
        ({"adapt_interval": -1}, "--adapt-interval: must be in [0, "),
        ({"alpha": float("nan")}, "--alpha: must be in [0.0, 1000.0], got nan"),
    ]:
        usage.append((lambda kw=kw: ks.check_args(ks.Args(**kw)), msg))
    for call, msg in usage:
        with pytest.raises(SystemExit) as e:
            call()
        err = capsys.readouterr().err
        assert (
            e.value.code == 2 and err.startswith("error: ") and msg in err and err.count("\n") == 1
        )


def test_rule_extraction_is_linear_in_the_text(ks, monkeypatch):
    """Issue 25: a 1 MB rules file of "{" took 137 s, one decode per "{" each scanning the whole prefix. Only objects
    that open with their "rules" key are tried, at most MAX_RULES of them, so a hostile text costs a bounded number
    of decodes (each linear)."""
    tries = []

    class Counting(json.JSONDecoder):
        def raw_decode(self, s, idx=0):
            tries.append(idx)
            return super().raw_decode(s, idx)

    monkeypatch.setattr(ks.json, "JSONDecoder", Counting)
    for hostile in ["{" * 200_000, '{"rules": [' * 20_000, '{"rules": 1} ' * 20_000]:
        tries.clear()
        with pytest.raises(ks.RuleError):
            ks.extract_rules_json(hostile)
        assert len(tries) <= ks.MAX_RULES, len(tries)
    tries.clear()
    good = '{"rules": [{"name": "a", "condition": "x > 1"}]}'
    assert ks.extract_rules_json("{" * 100_000 + good) == [{"name": "a", "condition": "x > 1"}]
    # as the scripts save it (rules.json: env_name first), and behind an object that has no rules
    saved = '{"env_name": "e", "rules": [{"name": "a", "condition": "x > 1"}], "rejected_rules": 0}'
    assert ks.extract_rules_json('{"a": 1} "rules": ' + saved)[0]["name"] == "a"


def test_rule_entries_of_the_wrong_type_are_rejected_and_counted(ks, monkeypatch):
    """Issue 25: {"rules": ["x > 0", ...]} (strings, not rule objects) reported "0 accepted, 0 rejected"; each entry
    that is no rule object is now a rejected rule, counted, next to the valid ones."""
    feats, ds = toy_features(ks)
    monkeypatch.setattr(ks, "RULE_MAX_FIRE", 0.5)  # x >= 5 fires on 3 of 7 rows
    rules = ks.extract_rules_json(
        '{"rules": ["x >= 5", 3, null, {"name": "ok", "condition": "x >= 5"}]}'
    )
    good, bad = ks.check_rules(rules, feats, ds["valids"] > 0, np.zeros(9, bool))
    assert [g["name"] for g in good] == ["ok"]
    assert [b["name"] for b in bad] == ["rule_0", "rule_1", "rule_2"]


def test_non_finite_loss_stops_before_saving(ks, capsys):
    """Issue 25: NaN losses ran to the end, exit 0, and saved NaN parameters. log_losses sees every logged loss on
    the host (the last step always logs, before anything is saved) and stops the run with one line naming the step."""

    class Writer:
        def add_scalar(self, *a):
            pass

    info = {"critic/critic_loss": np.array([0.5]), "value/value_loss": np.array([np.nan])}
    with pytest.raises(
        SystemExit, match=r"error: step 300: a loss is not finite: .*value_loss': nan"
    ):
        ks.log_losses(Writer(), 300, 10.0, info, [0.5], [1])
    info["value/value_loss"] = np.array([0.25])
    ks.log_losses(Writer(), 300, 10.0, info, [0.5], [1])  # finite: logs, no exit
    assert "step=300" in capsys.readouterr().out
