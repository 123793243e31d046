"""Build small OGBench-style datasets offline (test helper; reused by the keystate_* tests).

The official OGBench datasets cannot be downloaded here, so tests build their own, the way OGBench's generators do:
  * pointmaze-*-navigate: steer toward the BFS subgoal of the maze (env.unwrapped.get_oracle_subgoal) and add
    N(0, noise) action noise; a new goal cell is drawn whenever the current one is reached
    (see OGBench data_gen_scripts/generate_locomaze.py, dataset_type=navigate, noise=0.5 for pointmaze);
  * cube-single-play: ogbench.manipspace.oracles' CubePlanOracle, a new target whenever the oracle is done
    (see OGBench data_gen_scripts/generate_manipspace.py, dataset_type=play).
Files are written with np.savez_compressed in OGBench's layout: observations float32 (N, ob_dim), actions float32
(N, act_dim), terminals bool (N,) with 1 on each episode's last row, qpos, qvel; plus a `-val.npz` sibling, so both
`ogbench.make_env_and_datasets(name, dataset_path=...)` and the scripts' `--dataset-path` read them.

Usage: python tests/support/keystate_data.py pointmaze out.npz --episodes 20 --episode-steps 201
"""

import argparse
from collections import defaultdict
from pathlib import Path

import numpy as np


def _save(path: Path, data: dict, n_train_rows: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for k, v in data.items():
        arrays[k] = np.asarray(v, dtype=bool if k == "terminals" else np.float32)
    np.savez_compressed(path, **{k: v[:n_train_rows] for k, v in arrays.items()})
    np.savez_compressed(
        str(path).replace(".npz", "-val.npz"), **{k: v[n_train_rows:] for k, v in arrays.items()}
    )
    return path


def maze_cells(maze_map):
    """All free cells, and 'vertex' cells (free cells that are not straight hallway cells), as in OGBench."""
    all_cells, vertex_cells = [], []
    for i in range(maze_map.shape[0]):
        for j in range(maze_map.shape[1]):
            if maze_map[i, j] != 0:
                continue
            all_cells.append((i, j))
            vertical = (
                maze_map[i - 1, j] == 0
                and maze_map[i + 1, j] == 0
                and maze_map[i, j - 1] == 1
                and maze_map[i, j + 1] == 1
            )
            horizontal = (
                maze_map[i, j - 1] == 0
                and maze_map[i, j + 1] == 0
                and maze_map[i - 1, j] == 1
                and maze_map[i + 1, j] == 1
            )
            if not (vertical or horizontal):
                vertex_cells.append((i, j))
    return all_cells, vertex_cells


def build_pointmaze(
    path, maze="medium", episodes=20, episode_steps=201, noise=0.5, val_episodes=2, seed=0
):
    """A pointmaze-{maze}-navigate dataset: BFS-subgoal steering with Gaussian noise (about 3,000 env steps/s)."""
    import gymnasium
    import ogbench.locomaze  # noqa: F401  (registers the environments)

    rng = np.random.default_rng(seed)
    env = gymnasium.make(
        f"pointmaze-{maze}-v0", terminate_at_goal=False, max_episode_steps=episode_steps
    )
    all_cells, vertex_cells = maze_cells(env.unwrapped.maze_map)
    data = defaultdict(list)
    n_train_rows = 0
    for ep in range(episodes + val_episodes):
        init_ij = all_cells[rng.integers(len(all_cells))]
        goal_ij = vertex_cells[rng.integers(len(vertex_cells))]
        ob, _ = env.reset(
            seed=int(seed * 100_000 + ep),
            options=dict(task_info=dict(init_ij=init_ij, goal_ij=goal_ij)),
        )
        done = False
        while not done:
            xy = env.unwrapped.get_xy()
            subgoal_xy, _ = env.unwrapped.get_oracle_subgoal(xy, env.unwrapped.cur_goal_xy)
            direction = subgoal_xy - xy
            direction = direction / (np.linalg.norm(direction) + 1e-6)
            action = np.clip(direction + rng.normal(0, noise, 2), -1, 1)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if info["success"]:  # navigate: a new goal once the current one is reached
                env.unwrapped.set_goal(vertex_cells[rng.integers(len(vertex_cells))])
            data["observations"].append(ob)
            data["actions"].append(action)
            data["terminals"].append(done)
            data["qpos"].append(info["prev_qpos"])
            data["qvel"].append(info["prev_qvel"])
            ob = next_ob
        if ep == episodes - 1:
            n_train_rows = len(data["terminals"])
    env.close()
    return _save(Path(path), data, n_train_rows)


def build_cube_single(
    path, episodes=4, episode_steps=201, noise=0.1, noise_smoothing=0.5, val_episodes=1, seed=0
):
    """A cube-single-play dataset from OGBench's scripted CubePlanOracle (about 270 env steps/s)."""
    import gymnasium
    import ogbench.manipspace  # noqa: F401  (registers the environments)
    from ogbench.manipspace.oracles.plan.cube_plan import CubePlanOracle

    np.random.seed(
        seed
    )  # the oracle and the environment's task sampling use NumPy's global generator
    env = gymnasium.make(
        "cube-single-v0",
        terminate_at_goal=False,
        mode="data_collection",
        max_episode_steps=episode_steps,
    )
    oracle = CubePlanOracle(env=env, noise=noise, noise_smoothing=noise_smoothing)
    data = defaultdict(list)
    n_train_rows = 0
    for ep in range(episodes + val_episodes):
        ob, info = env.reset(seed=int(seed * 100_000 + ep))
        oracle.reset(ob, info)
        done = False
        while not done:
            action = np.clip(np.asarray(oracle.select_action(ob, info)), -1, 1)
            next_ob, _, terminated, truncated, info = env.step(action)
            done = terminated or truncated
            if oracle.done:
                agent_ob, agent_info = env.unwrapped.set_new_target(p_stack=0.0)
                oracle.reset(agent_ob, agent_info)
            data["observations"].append(ob)
            data["actions"].append(action)
            data["terminals"].append(done)
            data["qpos"].append(info["prev_qpos"])
            data["qvel"].append(info["prev_qvel"])
            ob = next_ob
        if ep == episodes - 1:
            n_train_rows = len(data["terminals"])
    env.close()
    return _save(Path(path), data, n_train_rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("kind", choices=["pointmaze", "cube-single"])
    p.add_argument("out")
    p.add_argument("--maze", default="medium")
    p.add_argument("--episodes", type=int, default=20)
    p.add_argument("--episode-steps", type=int, default=201)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.kind == "pointmaze":
        out = build_pointmaze(a.out, a.maze, a.episodes, a.episode_steps, seed=a.seed)
    else:
        out = build_cube_single(a.out, a.episodes, a.episode_steps, seed=a.seed)
    d = np.load(out)
    print(out, {k: d[k].shape for k in d.files})
