"""Relabels checked against the ALFWorld simulator by replay, both ways (the test and bench_hsl_oracle.py use it).

A goal the oracle relabeler found in a trajectory is a claim: "these actions, up to step S, achieve this goal, and the
actions marked z = 1 are the ones that matter". The simulator can check both claims once it has a game whose goal is
that goal. `verify` builds that game (the same room: receptacles and objects, only the goal differs; see
alfworld_games.py) and replays:
  1. the trajectory's actions: the simulator must report `won` exactly at step S (never: a false positive; earlier:
     S is late, or the goal held at reset, `held_at_reset`: the simulator then reports `won` after any first action,
     while the oracle counts such a goal only once the agent re-achieves it, by design);
  2. only the actions marked relevant (z = 1) up to S: the simulator must still report `won` (a needed action marked
     irrelevant fails here; irrelevant actions kept as relevant are not caught by this check).
"""

from pathlib import Path

from alfworld_games import write_game


def goal_spec(room: dict, goal) -> dict:
    """The spec of the game in `room` (a spec of alfworld_games.py) whose goal is `goal` = (task_type, object,
    receptacle or, for look_at_obj_in_light, lamp) in the oracle's lower-case names."""
    classes = {c.lower(): c for c in room["receptacles"] + [o for o, _ in room["objects"]]}
    task_type, obj, where = goal
    spec = dict(room, task_type=task_type, obj=classes[obj], toggle="")
    if task_type == "look_at_obj_in_light":
        spec["toggle"] = classes[
            where
        ]  # the goal library's look goal names the lamp, not a receptacle
    else:
        spec["recep"] = classes[where]
    return spec


def replay(hsl, gamefile, actions):
    """The first step (1-based) at which the simulator reports `won` while the actions are replayed, or None."""
    game = hsl.ALFWorldGame(str(gamefile))
    game.reset()
    for t, action in enumerate(actions, 1):
        if game.step(hsl.to_dialect(action, game.legacy_put))[1]:
            return t
    return None


def verify(hsl, room: dict, traj: dict, goal, S: int, z, workdir: Path, index: int) -> dict:
    """Both replays of one relabeled goal (S: the oracle's step, z: its relevance labels of actions 1..S)."""
    gamefile = write_game(Path(workdir) / "json_2.1.1" / "replay", goal_spec(room, goal), index)
    won_at = replay(hsl, gamefile, traj["actions"][:S])
    relevant = [a for a, keep in zip(traj["actions"][:S], z) if keep]
    relevant_won = replay(hsl, gamefile, relevant) is not None
    held_at_reset = replay(hsl, gamefile, ["look"]) == 1  # "look" changes nothing
    return dict(
        goal=goal,
        S=S,
        won_at=won_at,
        exact=won_at == S,
        relevant_won=relevant_won,
        held_at_reset=held_at_reset,
    )
