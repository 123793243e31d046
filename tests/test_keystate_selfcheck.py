"""The relabel-time self-check of both key-state scripts (keystate_gciql.py and keystate_hiql.py): the paired TD probe
with its distance-matched comparator, the rule that moves p_keystate (deadband, decaying step, warm-up), the closed
loop through `observe` with a stub critic whose TD gap is known, and the `--num-seeds` branches of `over_seeds` (a
loop inside the jit on CPU, vmap elsewhere), checked on the traced programs of the real updates. Each test is written
so that deleting the piece it names turns it red."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["keystate_gciql", "keystate_hiql"]


@pytest.fixture(scope="module", params=SCRIPTS)
def ks(request):
    spec = importlib.util.spec_from_file_location(request.param, REPO / f"{request.param}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def compact(obs, term):
    """A dataset as ogbench.load_dataset(compact_dataset=True) returns it (zero actions)."""
    return {
        "observations": obs,
        "actions": np.zeros((len(obs), 2), np.float32),
        "terminals": np.minimum(term + np.append(term[1:], 1), 1),
        "valids": 1.0 - term,
    }


class Writer:
    """The two methods of a TensorBoard SummaryWriter that the self-check calls."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, key, value, step):
        self.scalars.setdefault(key, []).append((step, value))


# --------------------------------------------------------------------------------------------------------- the probe
def test_probe_goals_are_paired_in_window_and_distance_matched(ks):
    """The probe's four goals (key state, matched, HER, uniform) share their row and lie in the same window
    (t, min(t + window, final)]; the key-state goal is a key state; the matched goal is the non-key state of the window
    nearest to it (brute force; ties to the earlier row); rows count only with a key state and a non-key state in the
    window. Dropping the matching (e.g. a HER or uniform goal in its place) fails the nearest-offset check."""
    import jax

    n_ep, ep_len, window = 4, 100, 30
    term = np.zeros(n_ep * ep_len, np.float32)
    term[ep_len - 1 :: ep_len] = 1
    obs = np.arange(n_ep * ep_len, dtype=np.float32)[:, None]
    ds = compact(obs, term)
    keys = [20, 21, 22, 60, 150, 390, 391, 392, 393, 394, 395, 396, 397, 398]  # runs of key states
    key_mask = np.zeros(len(obs), bool)
    key_mask[keys] = True
    data = ks.make_goal_data(ds, key_mask)
    args = ks.resolve_presets(
        ks.Args(env_name="pointmaze-medium-navigate-v0", batch_size=4096, keystate_window=window)
    )
    batch, *out = ks.probe_batch(jax.random.PRNGKey(0), data, args)
    goals, dist, counts = map(np.asarray, out)
    t = np.asarray(batch["observations"])[:, 0].astype(int)
    final = np.asarray(data["final_idxs"])[t]
    end = np.minimum(t + window, final)
    g = goals[..., 0].astype(int)  # (4, B) goal rows (observation = row index)
    np.testing.assert_array_equal(dist[1:], (g - t)[1:])
    has_key = np.array([key_mask[i + 1 : e + 1].any() for i, e in zip(t, end)])
    has_other = np.array([(~key_mask[i + 1 : e + 1]).any() for i, e in zip(t, end)])
    np.testing.assert_array_equal(counts, has_key & has_other)
    assert (
        counts.sum() > 1000 and (has_key & ~has_other).any()
    )  # the window of 390 holds key states only
    c = counts
    assert key_mask[g[0][c]].all() and not key_mask[g[1][c]].any()
    assert ((g[:, c] > t[c]) & (g[:, c] <= end[c])).all()
    for i in np.nonzero(c)[0][:500]:
        others = [r for r in range(t[i] + 1, end[i] + 1) if not key_mask[r]]
        # the nearest non-key row to the key-state goal, the earlier one on a tie
        assert g[1, i] == min(others, key=lambda r: (abs(r - g[0, i]), r)), i
    assert np.abs(dist[1][c] - dist[0][c]).mean() < 2  # matched: about the key state's distance
    assert (np.asarray(batch["rewards"]) == -1).all() and (np.asarray(batch["masks"]) == 1).all()
    her, uni = dist[2][c], dist[3][c]
    assert (
        her.mean() < uni.mean()
    )  # geometric (discount 0.99) truncated to the window vs uniform over it


# ------------------------------------------------------------------------------------------------------- the rule
def test_relabel_check_converges(ks):
    """On synthetic paired TD-difference streams (no training): key goals persistently harder -> p_keystate rises to
    its upper bound and stays; not harder -> falls and stays; constant input -> monotone; a gap that falls as p rises
    (training on key goals lowers their TD) -> p settles near the fixed point with ever smaller moves."""
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
    for const in (0.02, -0.02):  # a constant stream (zero variance) never reverses direction
        moves = np.diff(run(lambda p: const, noise=0.0))
        assert (moves >= 0).all() or (moves <= 0).all(), const
    fb = run(lambda p: 0.02 * (0.3 - p), decisions=2000, noise=0.02)  # the gap is zero at p = 0.3
    assert abs(fb[-200:].mean() - 0.3) < 0.05 and np.abs(np.diff(fb[-200:])).max() < 0.01
    assert np.abs(np.diff(fb[:50])).max() > 5 * np.abs(np.diff(fb[-200:])).max()  # moves shrink
    # rows that do not count (no key state in the window) do not enter the test
    check = ks.RelabelCheck(args, probing=True)
    check.adapt(np.array([[1.0, -5.0, -5.0]]), np.array([[True, False, False]]))
    assert check.p_keystate[0] == 0.5  # one row: no decision


def test_relabel_check_deadband_and_step_decay(ks):
    """The deadband: a gap whose z is below ADAPT_Z (here z = 1) never moves p, however often it is seen. The step:
    the k-th move (k = 0, 1, ...) is ADAPT_STEP * ADAPT_K0 / (ADAPT_K0 + k), counted per seed and only over decisions
    that moved p (an undecided probe in between does not shrink the next step)."""
    n = 256
    weak = np.where(np.arange(n) % 2 == 0, 1.0, -1.0) + 1.0 / np.sqrt(n)  # mean 1/16, sd ~1: z ~ 1
    check = ks.RelabelCheck(ks.Args(num_seeds=1, p_keystate=0.5), probing=True)
    for _ in range(100):
        _, z = check.adapt(weak[None], np.ones((1, n), bool))
        assert 0.5 < z[0] < ks.ADAPT_Z
    assert check.p_keystate[0] == 0.5
    # two seeds: seed 0 decided at every probe, seed 1 undecided at the second and fourth
    check = ks.RelabelCheck(ks.Args(num_seeds=2, p_keystate=0.2), probing=True)
    strong = np.full(n, 0.01)
    steps = ks.ADAPT_STEP * ks.ADAPT_K0 / (ks.ADAPT_K0 + np.arange(4))
    for i in range(4):
        check.adapt(np.stack([strong, strong if i % 2 == 0 else weak]), np.ones((2, n), bool))
    np.testing.assert_allclose(check.p_keystate, [0.2 + steps.sum(), 0.2 + steps[:2].sum()])


def stub_probe(gap_matched, gap_her, seeds=2, n=512, seed=0):
    """A stub critic's probe with known gaps: |TD| of key-state goals = 1 + noise, matched = key - gap_matched + noise,
    HER = key - gap_her, uniform = key; distances 50 / 50 / 20 / 50; every row counts."""
    rng = np.random.default_rng(seed)

    def probe():
        key = 1.0 + 0.01 * rng.standard_normal((seeds, n))
        noise = 0.01 * rng.standard_normal((seeds, n))
        td = np.stack([key, key - gap_matched + noise, key - gap_her, key], 1)
        dist = np.broadcast_to(np.array([50, 50, 20, 50])[None, :, None], td.shape)
        return td, dist, np.ones((seeds, n), bool)

    return probe


def test_observe_closed_loop_decides_on_the_matched_gap(ks, tmp_path):
    """observe() with a stub critic: key-state goals harder than the matched ones (+0.05) but easier than the nearer
    HER goals (-0.1), as when HER goals are nearer: p rises (it decides on key - matched), not
    before the warm-up (the first tenth of the steps), only at the probe interval; snapshots at each evaluation and
    at the end, saved as td_probe.npz with the matched gap first."""
    args = ks.Args(num_seeds=2, p_keystate=0.5, total_steps=1000, adapt_interval=10, eval_every=500)
    check, writer = ks.RelabelCheck(args, probing=True), Writer()
    probe = stub_probe(0.05, -0.1)
    for step in range(1, 101):
        check.observe(step, False, probe, writer)
    assert (check.p_keystate == 0.5).all() and not writer.scalars  # warm-up: 100 of 1,000 steps
    check.observe(105, False, probe, writer)
    assert (check.p_keystate == 0.5).all()  # not a probe step
    for step in range(110, 1001, 10):
        check.observe(step, step == 1000, probe, writer)
    assert (check.p_keystate == ks.P_KEYSTATE_MAX).all()
    gaps = writer.scalars["relabel/td_gap_key_minus_matched"]
    assert gaps[0][0] == 110 and np.allclose([v for _, v in gaps], 0.05, atol=0.01)
    assert [s for s, *_ in check.snapshots] == [500, 1000]
    check.save(tmp_path)
    out = np.load(tmp_path / "td_probe.npz")
    assert list(out["kinds"]) == ["keystate", "matched", "her", "uniform"]
    # per snapshot and seed: (2 snapshots, 2 seeds)
    assert out["gap_matched"].shape == out["gap_her"].shape == (2, 2)
    np.testing.assert_allclose(out["gap_matched"], 0.05, atol=0.01)
    np.testing.assert_allclose(out["gap_her"], -0.1, atol=0.01)
    np.testing.assert_allclose(out["gap_uniform"], 0.0, atol=1e-12)
    assert (tmp_path / "td_probe.png").stat().st_size > 0
    # the opposite sign sends p to its floor; a fixed p (--adapt-interval 0) never moves
    for interval, want in ((10, ks.P_KEYSTATE_MIN), (0, 0.5)):
        args.adapt_interval = interval
        check = ks.RelabelCheck(args, probing=True)
        for step in range(1, 1001):
            check.observe(step, step == 1000, stub_probe(-0.05, 0.1), writer)
        assert (check.p_keystate == want).all()


# ------------------------------------------------------------------------------------------------ --num-seeds
def three_seeds(ks):
    """Args, goal data and a fresh 3-seed agent state (a function: the update donates its input) on a
    300-row dataset with 43 key states."""
    import jax
    import jax.numpy as jnp

    args = ks.resolve_presets(
        ks.Args(
            env_name="pointmaze-medium-navigate-v0",
            hidden_dims=(16, 16),
            batch_size=32,
            num_seeds=3,
        )
    )
    n = 300
    term = np.zeros(n, np.float32)
    term[99::100] = 1
    ds = compact(np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32), term)
    key_mask = np.zeros(n, bool)
    key_mask[5::7] = True
    data = ks.make_goal_data(ds, key_mask, ks.episode_subsets(ds, args))

    def state():
        return jax.vmap(lambda s: ks.make_agent(args, 2, 2, jax.random.PRNGKey(s))[2])(
            jnp.arange(3)
        )

    nets, tx, _ = ks.make_agent(args, 2, 2, jax.random.PRNGKey(0))
    return args, data, nets, tx, state


def test_over_seeds_branches_in_the_traced_update(ks, monkeypatch):
    """The real update and probe of 3 seeds, traced: on CPU the seeds loop inside the jit (a scan of length 3 in the
    program; the other scans: jnp.searchsorted's over the 43 key states, length 6, and the update's chunk, length 1);
    elsewhere they are vmapped (no such scan), and the numbers agree with the loop's."""
    import jax
    import jax.numpy as jnp

    args, data, nets, tx, state = three_seeds(ks)
    p = jnp.full(3, 0.5)
    out = {}
    for backend in ("cpu", "gpu"):
        monkeypatch.setattr(ks.jax, "default_backend", lambda b=backend: b)
        update, probe = ks.make_update(args, nets, tx)
        for name, fn, inputs in (
            ("update", update, (state(), data, p)),
            ("probe", probe, (state(), data)),
        ):
            text = str(jax.make_jaxpr(fn)(*inputs))
            assert ("length=3" in text) == (backend == "cpu"), (backend, name)
        out[backend] = (np.asarray(probe(state(), data)[0]), update(state(), data, p)[1])
    np.testing.assert_allclose(out["gpu"][0], out["cpu"][0], rtol=1e-4, atol=1e-6)
    for k, v in out["cpu"][1].items():
        np.testing.assert_allclose(
            np.asarray(out["gpu"][1][k]), np.asarray(v), rtol=1e-4, atol=1e-6
        )


def test_chunked_update_equals_one_step_calls(ks):
    """make_update(..., chunk=4): one call runs each seed's 4 steps (one scan per seed, so its parameters stay in the
    CPU cache) and equals 4 one-step calls: the same RNG stream, parameters equal up to float rounding, each step's
    info (seeds, steps)."""
    import jax
    import jax.numpy as jnp

    args, data, nets, tx, state = three_seeds(ks)
    p = jnp.full(3, 0.5)
    one, _ = ks.make_update(args, nets, tx)
    four, _ = ks.make_update(args, nets, tx, 4)
    a = state()
    infos = []
    for _ in range(4):
        a, info = one(a, data, p)
        infos.append(info)
    b, info4 = four(state(), data, p)
    np.testing.assert_array_equal(np.asarray(a.rng), np.asarray(b.rng))
    jax.tree_util.tree_map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6), a.params, b.params
    )
    for k, v in info4.items():
        assert v.shape == (3, 4), k
        want = np.concatenate([np.asarray(i[k]) for i in infos], 1)
        np.testing.assert_allclose(np.asarray(v), want, rtol=1e-4, atol=1e-6)
