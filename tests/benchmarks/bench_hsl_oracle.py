"""Issue 14 item 4: the oracle relabeler of hsl_sft.py against the ALFWorld simulator, on games in rooms the tests never
use (a bathroom, a bedroom with a desk lamp, a dining kitchen; all six task types), and the goal types it relabels.

For every game: (1) ALFWorld's hand-coded expert plays it to the win; the oracle must find the game's own goal at the
step the simulator reports `won` (agreement: goal string and S); (2) a random agent (uniform over the admissible
commands, seeded) plays --random-episodes episodes of --steps steps; every goal the oracle finds in them is what a
hindsight relabeler can add to D'. Prints the agreement, the relabeled goal-type distribution next to the games' own,
and the share of actions the oracle marks relevant. Then every goal the oracle relabeled (from the expert's and from
random play) is checked against the simulator by replay (tests/support/alfworld_replay.py): on a game of the same room
whose goal is the relabeled one, the trajectory's actions must win exactly at S, and the actions marked relevant
(z = 1) alone must still win.

    OMP_NUM_THREADS=1 taskset -c 0 python tests/benchmarks/bench_hsl_oracle.py --random-episodes 5 --steps 40 \
        --out docs/results/hsl_oracle_replay.json
"""

import argparse
import collections
import importlib.util
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "support"))
from alfworld_games import build_games  # noqa: E402
from alfworld_replay import verify  # noqa: E402

BATH = ["Toilet", "SinkBasin", "Cabinet", "CounterTop", "Shelf"]
BED = ["Bed", "Desk", "Dresser", "SideTable", "Shelf"]
DINE = ["DiningTable", "CounterTop", "Fridge", "Microwave", "SinkBasin", "Cabinet"]
G = lambda tt, o, r, room, objs, toggle="": dict(
    task_type=tt, obj=o, recep=r, receptacles=room, objects=objs, toggle=toggle
)
NEW_ROOMS = [
    G(
        "pick_and_place_simple",
        "SoapBar",
        "Cabinet",
        BATH,
        [("SoapBar", 3), ("Cloth", 1), ("Candle", 4)],
    ),
    G("pick_clean_then_place_in_recep", "Cloth", "Shelf", BATH, [("Cloth", 0), ("SoapBar", 3)]),
    G(
        "pick_two_obj_and_place",
        "ToiletPaper",
        "Cabinet",
        BATH,
        [("ToiletPaper", 0), ("ToiletPaper", 3), ("Candle", 4)],
    ),
    G(
        "pick_and_place_simple",
        "CellPhone",
        "Dresser",
        BED,
        [("CellPhone", 0), ("Book", 1), ("KeyChain", 3)],
    ),
    G("look_at_obj_in_light", "Book", "Desk", BED, [("Book", 0), ("DeskLamp", 1)], "DeskLamp"),
    G(
        "look_at_obj_in_light",
        "CellPhone",
        "SideTable",
        BED,
        [("CellPhone", 4), ("DeskLamp", 3)],
        "DeskLamp",
    ),
    G("pick_two_obj_and_place", "CD", "SideTable", BED, [("CD", 0), ("CD", 4), ("Book", 3)]),
    G(
        "pick_heat_then_place_in_recep",
        "Potato",
        "DiningTable",
        DINE,
        [("Potato", 1), ("Plate", 0)],
    ),
    G(
        "pick_cool_then_place_in_recep",
        "Lettuce",
        "DiningTable",
        DINE,
        [("Lettuce", 5), ("Tomato", 1)],
    ),
    G("pick_clean_then_place_in_recep", "Plate", "Cabinet", DINE, [("Plate", 0), ("Potato", 1)]),
    G(
        "pick_cool_then_place_in_recep",
        "Tomato",
        "CounterTop",
        DINE,
        [("Tomato", 0), ("Lettuce", 2)],
    ),
    G("pick_heat_then_place_in_recep", "Mug", "Cabinet", DINE, [("Mug", 2), ("Plate", 1)]),
    G("pick_and_place_simple", "Bowl", "Fridge", DINE, [("Bowl", 0), ("Potato", 5)]),
    G(
        "pick_two_obj_and_place",
        "Potato",
        "CounterTop",
        DINE,
        [("Potato", 0), ("Potato", 2), ("Tomato", 5)],
    ),
]


def play(hsl, gamefile: str, policy, steps: int) -> dict:
    game = hsl.ALFWorldGame(gamefile, expert=policy == "expert")
    intro, instruction, gs = game.reset()
    traj = dict(
        intro=intro, instruction=instruction, actions=[], observations=[], won=False, won_at=None
    )
    traj["states"] = [hsl.summarize_facts(gs["facts"])]
    for t in range(steps):
        a = (
            gs["extra.expert_plan"][0]
            if policy == "expert"
            else policy.choice(sorted(gs["admissible_commands"]))
        )
        obs, won, done, gs = game.step(hsl.to_dialect(a, game.legacy_put))
        traj["actions"].append(a)
        traj["observations"].append(obs)
        traj["states"].append(hsl.summarize_facts(gs["facts"]))
        traj["won_at"] = traj["won_at"] or (t + 1 if won else None)
        if won and policy == "expert":
            break
    return traj, game


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--random-episodes", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument(
        "--out", default=None, help="write the counts and every replay check as JSON here"
    )
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location(
        "hsl_sft", Path(__file__).resolve().parents[2] / "hsl_sft.py"
    )
    hsl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hsl)
    root = build_games(tempfile.mkdtemp(), {"train": NEW_ROOMS})
    workdir = Path(tempfile.mkdtemp())
    checks = {"expert": [], "random": []}
    games = hsl.list_games(str(root), "train")
    agree, expert_won, relabeled, own, z_share = (
        0,
        0,
        collections.Counter(),
        collections.Counter(),
        [],
    )
    for g in games:
        traj, game = play(hsl, g, "expert", 60)
        spec = next(s for s in NEW_ROOMS if f"{s['task_type']}-{s['obj']}-None-{s['recep']}-" in g)
        lamp = (
            spec["toggle"].lower()
            if spec["task_type"] == "look_at_obj_in_light"
            else spec["recep"].lower()
        )
        goal = (spec["task_type"], spec["obj"].lower(), lamp)
        found = {gg: S for gg, S, _ in hsl.oracle_goals(traj)}
        for gg, S, facts in hsl.oracle_goals(traj):
            z = hsl.oracle_relevance(traj, facts, S)
            checks["expert"].append(
                verify(hsl, spec, traj, gg, S, z, workdir, len(sum(checks.values(), [])))
            )
        expert_won += traj["won_at"] is not None
        ok = traj["won_at"] is not None and found.get(goal) == traj["won_at"]
        agree += ok
        own[hsl.TASK_SHORT[spec["task_type"]]] += 1
        print(
            f"{Path(g).parent.parent.name:60s} expert won at {traj['won_at']}, oracle {found.get(goal)}: {ok}"
        )
        rng = random.Random(0)
        for _ in range(args.random_episodes):
            traj, _ = play(hsl, g, rng, args.steps)
            for gg, S, facts in hsl.oracle_goals(traj):
                relabeled[hsl.TASK_SHORT[gg[0]]] += 1
                z = hsl.oracle_relevance(traj, facts, S)
                z_share.append(sum(z) / len(z))
                index = len(sum(checks.values(), []))
                checks["random"].append(verify(hsl, spec, traj, gg, S, z, workdir, index))
    print(
        f"\noracle agrees with the simulator on {agree} of {len(games)} games (expert won {expert_won})"
    )
    total = sum(relabeled.values())
    print(
        f"random agent, {args.random_episodes} x {args.steps}-step episodes per game: {total} relabeled goals"
    )
    print("goal type | games' own | relabeled from random play")
    for tt in hsl.TASK_SHORT.values():
        print(
            f"{tt:8s} | {own[tt] / len(games):.2f} | {relabeled[tt] / max(total, 1):.2f} ({relabeled[tt]})"
        )
    print(
        f"mean share of actions marked relevant (z = 1) per relabeled demo: {sum(z_share) / max(len(z_share), 1):.3f}"
    )
    print("\nreplay on a game of the same room whose goal is the relabeled one:")
    print(
        "play | relabeled goals | simulator won exactly at S | goal held at reset (simulator: won at step 1) "
        "| won earlier otherwise | never won | z = 1 actions alone won"
    )
    for who, rows in checks.items():
        held = sum(r["held_at_reset"] for r in rows)
        earlier = sum(
            r["won_at"] is not None and r["won_at"] < r["S"] and not r["held_at_reset"]
            for r in rows
        )
        never = sum(r["won_at"] is None for r in rows)
        exact = sum(r["exact"] for r in rows)
        relevant = sum(r["relevant_won"] for r in rows)
        print(f"{who} | {len(rows)} | {exact} | {held} | {earlier} | {never} | {relevant}")
        for r in rows:
            if not (r["exact"] or r["held_at_reset"]) or not r["relevant_won"]:
                print(f"  disagreement: {r}")
    if args.out:
        report = dict(
            games=len(games),
            expert_won=expert_won,
            oracle_agrees_with_simulator=agree,
            random_episodes_per_game=args.random_episodes,
            steps=args.steps,
            relabeled_from_random=dict(relabeled),
            games_own=dict(own),
            mean_relevant_share=sum(z_share) / max(len(z_share), 1),
            replay=checks,
        )
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
