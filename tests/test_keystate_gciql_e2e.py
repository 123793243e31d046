"""End-to-end tests of keystate_gciql.py, run as a user runs it: smoke runs (a rules file; real SmolLM2 rule writer,
plumbing only; rule generation through a scripted OpenAI-compatible endpoint with good, malformed and hostile answers
and HTTP errors), rules round trips and fallbacks, on a pointmaze dataset built offline (tests/support/keystate_data.py).
Unit tests of the method's pieces: tests/test_keystate_gciql.py."""

import importlib.util
import json
import re
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
        assert (
            td["td"].shape[:3] == (steps, n_seeds, 4)
            and td["counts"].any()
            and list(td["kinds"]) == ["keystate", "matched", "her", "uniform"]
        )
        # per snapshot and seed: the mean paired gap over the rows that count
        for i, kind in enumerate(["matched", "her", "uniform"], 1):
            gap = (td["td"][:, :, 0] - td["td"][:, :, i]) * td["counts"]
            expected = gap.sum(-1) / td["counts"].sum(-1)
            assert td[f"gap_{kind}"].shape == (steps, n_seeds), kind
            assert np.allclose(td[f"gap_{kind}"], expected, equal_nan=True), kind
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
    assert [x["name"] for x in saved["rules"]] == [
        "turning_event",
        "stop",
    ]  # saved with the run (--rules-path)
    assert "accepted turning_event" in r.output and re.search(
        r"p_keystate=[0-9.]+,[0-9.]+$", r.output, re.M
    )
    final = json.loads(
        (run_dir / "final_eval.json").read_text()
    )  # per seed, and the mean over seeds
    assert (
        final["seeds"] == [1, 2]
        and len(final["per_seed"]) == 2
        and set(final) - {"seeds", "per_seed"} == set(final["per_seed"][0])
    )
    assert final["eval/overall_success"] == pytest.approx(
        np.mean([r["eval/overall_success"] for r in final["per_seed"]])
    )
    assert np.load(run_dir / "td_probe.npz")["td"].shape[1] == 2 and "seed1x2__" in run_dir.name
    assert (run_dir / "params.msgpack").stat().st_size > 0


def test_smollm2_rules_go_through_the_compiler(ks, pointmaze_npz, smollm2_dir, tmp_path):
    """Plumbing only, in process: the real SmolLM2-135M-Instruct gets the rule prompt and answers; whatever it writes
    goes through the extraction, the compiler and the self-check (a weak model's rules may all be rejected: then HER,
    no key-state mask). Training on the rules is the code test_smoke_with_rules_file runs; relabeling semantics are
    tested with the scripted endpoint below."""
    import torch

    torch.set_num_threads(1)
    args = ks.Args(
        env_name="pointmaze-medium-navigate-v0",
        llm_backend="transformers",
        llm_model=str(smollm2_dir),
        llm_max_new_tokens=48,
    )
    logs = []
    mask = build_mask(ks, args, pointmaze_dataset(ks, pointmaze_npz), tmp_path, logs.append)
    assert any(m.startswith("[rules] LLM round 0 answered") for m in logs)
    saved = json.loads((tmp_path / "rules.json").read_text())
    assert saved["llm_failures"] == 0 and all(
        0.001 <= x["fire_rate"] <= 0.3 for x in saved["rules"]
    )
    assert (mask is None) == (saved["rules"] == [])


STOP_RULE = {
    "name": "stop",
    "description": "nearly at rest",
    "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15",
}


def test_rule_generation_through_scripted_endpoint(
    run_script, scripted_llm, pointmaze_npz, tmp_path
):
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
    assert not re.search(
        r"^pwned$", out, re.M
    )  # the answer is logged, but nothing in it was executed
    assert (
        "(whole answer)" in out and "x > 1 and y < 2" in scripted_llm.requests[1][0]["content"]
    )  # repair prompt
    assert "rejected pwn" in out and "rejected huge" in out and "accepted stop" in out
    saved, _ = check_smoke_output(
        out, tmp_path / "runs"
    )  # key-state goals were sampled: the rule is used
    assert [x["name"] for x in saved["rules"]] == ["stop"]
    assert (
        saved["rejected_rules"] == 3 and saved["llm_failures"] == 0
    )  # the malformed answer + two hostile rules


def test_llm_http_errors_fall_back_to_her(ks, scripted_llm, pointmaze_npz, tmp_path, capsys):
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
    # one line per failed round (the client's), and the fallback
    assert capsys.readouterr().out.count("[llm] request failed") == 3
    assert any("falling back to HER" in m for m in logs)
    saved = json.loads((tmp_path / "rules.json").read_text())
    assert saved["llm_failures"] == 3 and saved["rules"] == []
    assert (
        len(scripted_llm.requests) == 9
    )  # 1 + MAX_REPAIR_ROUNDS rounds, each the request and its two retries


def test_no_valid_rule_falls_back_to_her(ks, pointmaze_npz, tmp_path):
    """Compile-time self-check with nothing valid left: logged rejections, a warning, and no key-state mask (HER)."""
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            {
                "rules": [
                    {"name": "always", "condition": "x > -1000"},
                    {"name": "attr", "condition": "x.real > 0"},
                ]
            }
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
    b = ks.sample_batch(
        jax.random.PRNGKey(0), data, ks.resolve_presets(ks.Args(batch_size=512)), 1.0
    )
    assert not np.asarray(b["value_goal_is_key"]).any()


def test_saved_rules_roundtrip(ks, pointmaze_npz, tmp_path):
    """The rule set saved with a run can be passed back with --rules-path and gives the same key states."""
    rules = tmp_path / "in.json"
    rules.write_text(
        json.dumps(
            {
                "rules": [
                    {
                        "name": "stop",
                        "description": "rest",
                        "condition": "norm(delta(x, 3), delta(y, 3)) < 0.15",
                    }
                ]
            }
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
    assert giant == ks.read_layout(
        ks.Args(env_name="pointmaze-medium-navigate-v0")
    )  # one layout per env family
    # antmaze: torso x, y, unit quaternion
    env = ogbench.make_env_and_datasets("antmaze-large-navigate-v0", env_only=True)
    ob, _ = env.reset(seed=0, options=dict(task_id=1))
    f = layout("antmaze-large-navigate-v0")
    assert ob.shape == (29,) and max(f.values()) < 29
    np.testing.assert_allclose(ob[[f["x"], f["y"]]], env.unwrapped.get_xy(), atol=1e-5)
    for _ in range(
        3
    ):  # reset noise leaves the quaternion unnormalised; MuJoCo normalises it on the first step
        ob, *_ = env.step(env.action_space.sample())
    assert np.linalg.norm(ob[[f["qw"], f["qx"], f["qy"], f["qz"]]]) == pytest.approx(1, abs=1e-3)
    np.testing.assert_allclose(
        ob[[f[k] for k in ("vx", "vy", "vz", "wx", "wy", "wz")]],
        env.unwrapped.data.qvel[:6],
        atol=1e-5,
    )
    # cube-single: a short oracle episode (OGBench's CubePlanOracle); cube starts resting on the table
    path = build_cube_single(
        tmp_path / "cube-single-play-v0.npz", episodes=1, episode_steps=60, val_episodes=0
    )
    obs = np.load(path)["observations"]
    f = layout("cube-single-play-v0")
    assert obs.shape[1] == 28 and max(f.values()) < 28
    assert 0.15 < obs[0, f["cube_z"]] < 0.25
    np.testing.assert_allclose(
        np.linalg.norm(obs[:, [f["cube_qw"], f["cube_qx"], f["cube_qy"], f["cube_qz"]]], axis=1),
        1,
        atol=1e-3,
    )
    np.testing.assert_allclose(
        obs[:, f["ee_cos_yaw"]] ** 2 + obs[:, f["ee_sin_yaw"]] ** 2, 1, atol=1e-3
    )
    np.testing.assert_allclose(
        obs[:, f["cube_cos_yaw"]] ** 2 + obs[:, f["cube_sin_yaw"]] ** 2, 1, atol=1e-3
    )
    assert np.all((obs[:, f["grip_contact"]] >= 0) & (obs[:, f["grip_contact"]] <= 1))
