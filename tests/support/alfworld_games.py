"""Build small *real* ALFWorld games offline, in the $ALFWORLD_DATA/json_2.1.1/{train,valid_seen,valid_unseen} layout.

Test helper (tests may share code; the scripts may not). It follows the verified recipe in
../shared/recipes/alfworld_make_game.py: only what the `alfworld` wheel ships is used (the PDDL domain
`alfworld/data/alfred.pddl`, the grammar `alfworld/data/alfred.twl2`, the goal library `alfworld/gen/goal_library.py`
and the receptacle/object tables in `alfworld/gen/constants.py`). Each game folder holds
    initial_state.pddl  traj_data.json  game.tw-pddl
so `alfworld.agents.environment.get_environment("AlfredTWEnv")(config, split)` finds and loads it, and the shipped
hand-coded expert (AlfredExpert, HANDCODED) solves it.

Usage (from a test):
    from alfworld_games import build_games, TINY_SPLITS
    data_dir = build_games(tmp_path / "alfworld", TINY_SPLITS)      # -> tmp_path/alfworld (pass as $ALFWORLD_DATA)
    build_games(root, TINY_SPLITS, legacy_put=True)                 # pre-0.4 "put X in/on Y" command dialect

A game spec is a dict:
    task_type   one of the six ALFWorld task types (pick_and_place_simple, look_at_obj_in_light,
                pick_clean_then_place_in_recep, pick_heat_then_place_in_recep, pick_cool_then_place_in_recep,
                pick_two_obj_and_place)
    obj, recep  ALFRED class names of the goal object and receptacle (e.g. "Mug", "Shelf")
    toggle      ALFRED class of the light for look_at_obj_in_light ("DeskLamp" / "FloorLamp"), else ""
    receptacles list of receptacle classes in the room (instances numbered in order: "shelf 1", "shelf 2", ...)
    objects     list of (ObjectClass, index into receptacles) placing each object
"""

import json
import os
import random
from pathlib import Path

# Instance numbering: AlfredDemangler numbers instances of a class in reverse sorted-id order, so a decreasing
# x coordinate makes the first listed instance of a class "<class> 1" (see the recipe).


def mangle(s: str) -> str:
    """ALFRED id mangling, as alfworld's scripts/augment_pddl_states.py:fix_pddl_str_chars ('#' = PDDL's '-')."""
    for a, b in (
        ("-", "_minus_"),
        ("#", "-"),
        ("|", "_bar_"),
        ("+", "_plus_"),
        (".", "_dot_"),
        (",", "_comma_"),
    ):
        s = s.replace(a, b)
    return s


def thor_id(cls: str, i: int) -> str:
    """THOR-style object id with fake coordinates; basins are "Sink|...|SinkBasin" in ALFRED."""
    base = "%s|+%05.2f|+00.%02d|-%05.2f" % (
        cls.replace("Basin", ""),
        99.0 - 0.25 * i,
        10 + i,
        0.5 * i + 0.3,
    )
    return base + "|" + cls if cls.endswith("Basin") else base


def build_problem(spec: dict, task_id: str) -> str:
    """The PDDL problem (initial state + the task type's goal from alfworld's goal library), mangled."""
    import alfworld.gen.constants as C
    import alfworld.gen.goal_library as glib

    recep_ids = [thor_id(r, i) for i, r in enumerate(spec["receptacles"])]
    recep_locs = ["loc|%d|%d|%d|45" % (i, -i, i % 4) for i in range(len(recep_ids))]
    agent_loc = "loc|9|9|0|30"  # next to no receptacle: "You are in the middle of a room"
    obj_ids = [thor_id(o, 20 + j) for j, (o, _) in enumerate(spec["objects"])]
    otypes = sorted(
        {o for o, _ in spec["objects"]}
        | {spec["obj"]}
        | ({spec["toggle"]} if spec.get("toggle") else set())
    )
    rtypes = sorted(set(spec["receptacles"]))

    objects = ["agent1 # agent"]
    objects += ["%sType # otype" % t for t in otypes]
    objects += ["%sType # rtype" % t for t in rtypes]
    objects += ["%s # object" % o for o in obj_ids]
    objects += ["%s # receptacle" % r for r in recep_ids]
    objects += ["%s # location" % loc for loc in sorted(set(recep_locs + [agent_loc]))]

    init = ["(atLocation agent1 %s)" % agent_loc]
    for r, cls, loc in zip(recep_ids, spec["receptacles"], recep_locs):
        init.append("(receptacleType %s %sType)" % (r, cls))
        init.append("(receptacleAtLocation %s %s)" % (r, loc))
        if cls in C.OPENABLE_CLASS_SET:
            init.append("(openable %s)" % r)
    for rt in rtypes:  # which receptacle holds which object, from ALFRED's compatibility table
        for ot in otypes:
            if ot in C.VAL_RECEPTACLE_OBJECTS.get(rt, ()):
                init.append("(canContain %sType %sType)" % (rt, ot))
    for o, (cls, ri) in zip(obj_ids, spec["objects"]):
        init.append("(objectType %s %sType)" % (o, cls))
        if cls not in C.VAL_ACTION_OBJECTS["Toggleable"]:  # lamps stay where they are
            init.append("(pickupable %s)" % o)
        if cls in C.MOVABLE_RECEPTACLES_SET:
            init.append("(isReceptacleObject %s)" % o)
        for prop, key in (
            ("cleanable", "Cleanable"),
            ("heatable", "Heatable"),
            ("coolable", "Coolable"),
            ("sliceable", "Sliceable"),
            ("toggleable", "Toggleable"),
        ):
            if cls in C.VAL_ACTION_OBJECTS[key]:
                init.append("(%s %s)" % (prop, o))
        init.append("(inReceptacle %s %s)" % (o, recep_ids[ri]))
        init.append("(objectAtLocation %s %s)" % (o, recep_locs[ri]))

    goal = glib.gdict[spec["task_type"]]["pddl"].format(
        obj=spec["obj"], recep=spec["recep"], toggle=spec.get("toggle", ""), mrecep=""
    )
    pddl = (
        "(define (problem plan_%s)\n(:domain alfred)\n(:objects\n    %s\n    )\n(:init\n    %s\n    )\n%s"
        % (
            task_id,
            "\n    ".join(objects),
            "\n    ".join(init),
            goal,
        )
    )
    return mangle(pddl)


def load_logic(legacy_put: bool = False):
    """Domain and grammar from the wheel; legacy_put reverts alfworld 0.4's "move X to Y" to "put X in/on Y"."""
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    domain = open(ALFRED_PDDL_PATH).read()
    grammar = open(ALFRED_TWL2_PATH).read()
    if legacy_put:
        grammar = grammar.replace(
            'template :: "move {o} to {r}"', 'template :: "put {o} in/on {r}"'
        )
        grammar = grammar.replace(
            "You move the {o.name} to the {r.name}.", "You put the {o.name} in/on the {r.name}."
        )
    return domain, grammar


def write_game(split_dir: Path, spec: dict, index: int, legacy_put: bool = False) -> Path:
    """Write one game folder under split_dir; returns the path of its game.tw-pddl."""
    from alfworld.agents.utils.misc import add_task_to_grammar

    domain, grammar = load_logic(legacy_put)
    task_id = "trial_T0000_%04d" % index
    d = (
        Path(split_dir)
        / ("%s-%s-None-%s-%d" % (spec["task_type"], spec["obj"], spec["recep"], index))
        / task_id
    )
    d.mkdir(parents=True, exist_ok=True)
    traj = {
        "task_id": task_id,
        "task_type": spec["task_type"],
        "pddl_params": {
            "object_target": spec["obj"],
            "parent_target": spec["recep"],
            "mrecep_target": "",
            "toggle_target": spec.get("toggle", ""),
            "object_sliced": False,
        },
        "turk_annotations": {"anns": [{"task_desc": "synthetic", "high_descs": [], "votes": [1]}]},
        "scene": {"floor_plan": "Synthetic", "scene_num": 0},
    }
    problem = build_problem(spec, task_id)
    random.seed(
        index
    )  # add_task_to_grammar picks one of the two goal phrasings with the global RNG
    game = {
        "pddl_domain": domain,
        "grammar": add_task_to_grammar(grammar, traj),
        "pddl_problem": problem,
        "solvable": True,
        "walkthrough": [],
    }
    (d / "initial_state.pddl").write_text(problem)
    (d / "traj_data.json").write_text(json.dumps(traj, indent=1))
    (d / "game.tw-pddl").write_text(json.dumps(game))
    return d / "game.tw-pddl"


def build_games(root, splits: dict, legacy_put: bool = False) -> Path:
    """Write {split: [spec, ...]} under root/json_2.1.1/<split>/; returns root (use it as $ALFWORLD_DATA)."""
    root = Path(root)
    n = 0
    for split, specs in splits.items():
        for spec in specs:
            write_game(root / "json_2.1.1" / split, spec, n, legacy_put)
            n += 1
    return root


# ---------------------------------------------------------------------------------------------------------------
# Tiny rooms: 3-4 receptacles, 1-3 objects, no closed containers on the way, so that a few random admissible
# actions already achieve pick-and-place goals (what a hindsight relabeler needs to find something).
# ---------------------------------------------------------------------------------------------------------------
ROOM_A = ["CounterTop", "Shelf", "DiningTable"]
ROOM_B = ["SideTable", "Shelf", "CounterTop"]
ROOM_LAMP = ["SideTable", "Desk", "Shelf"]
ROOM_KITCHEN = ["CounterTop", "SinkBasin", "Microwave", "Fridge", "Shelf"]

TINY_TRAIN = [
    dict(
        task_type="pick_and_place_simple",
        obj="Mug",
        recep="Shelf",
        receptacles=ROOM_A,
        objects=[("Mug", 0), ("Apple", 2)],
    ),
    dict(
        task_type="pick_and_place_simple",
        obj="Apple",
        recep="CounterTop",
        receptacles=ROOM_A,
        objects=[("Apple", 2), ("Cup", 1)],
    ),
    dict(
        task_type="pick_two_obj_and_place",
        obj="Cup",
        recep="CounterTop",
        receptacles=ROOM_B,
        objects=[("Cup", 0), ("Cup", 1), ("Book", 2)],
    ),
    dict(
        task_type="look_at_obj_in_light",
        obj="Book",
        recep="Desk",
        toggle="DeskLamp",
        receptacles=ROOM_LAMP,
        objects=[("Book", 2), ("DeskLamp", 0)],
    ),
    dict(
        task_type="pick_heat_then_place_in_recep",
        obj="Egg",
        recep="CounterTop",
        receptacles=ROOM_KITCHEN,
        objects=[("Egg", 4), ("Mug", 0)],
    ),
    dict(
        task_type="pick_clean_then_place_in_recep",
        obj="Mug",
        recep="Shelf",
        receptacles=ROOM_KITCHEN,
        objects=[("Mug", 0), ("Apple", 0)],
    ),
]
TINY_SEEN = [
    dict(
        task_type="pick_and_place_simple",
        obj="Mug",
        recep="DiningTable",
        receptacles=ROOM_A,
        objects=[("Mug", 1), ("Apple", 0)],
    ),
    dict(
        task_type="pick_cool_then_place_in_recep",
        obj="Apple",
        recep="CounterTop",
        receptacles=ROOM_KITCHEN,
        objects=[("Apple", 4), ("Mug", 0)],
    ),
]
TINY_UNSEEN = [
    dict(
        task_type="pick_and_place_simple",
        obj="Book",
        recep="Shelf",
        receptacles=ROOM_B,
        objects=[("Book", 0), ("Cup", 2)],
    ),
    dict(
        task_type="pick_two_obj_and_place",
        obj="Cup",
        recep="Shelf",
        receptacles=ROOM_B,
        objects=[("Cup", 0), ("Cup", 2)],
    ),
]
TINY_SPLITS = {"train": TINY_TRAIN, "valid_seen": TINY_SEEN, "valid_unseen": TINY_UNSEEN}

# Two-receptacle rooms with pick-and-place goals: a random agent achieves some goal in a few steps (used by the
# smoke runs, whose untrained agent picks among the admissible commands).
ROOM_2 = ["CounterTop", "Shelf"]
PUT_SPLITS = {
    "train": [
        dict(
            task_type="pick_and_place_simple",
            obj="Mug",
            recep="Shelf",
            receptacles=ROOM_2,
            objects=[("Mug", 0)],
        ),
        dict(
            task_type="pick_and_place_simple",
            obj="Cup",
            recep="CounterTop",
            receptacles=ROOM_2,
            objects=[("Cup", 1), ("Mug", 0)],
        ),
    ],
    "valid_seen": [
        dict(
            task_type="pick_and_place_simple",
            obj="Mug",
            recep="CounterTop",
            receptacles=ROOM_2,
            objects=[("Mug", 1)],
        )
    ],
    "valid_unseen": [
        dict(
            task_type="pick_and_place_simple",
            obj="Book",
            recep="Shelf",
            receptacles=ROOM_2,
            objects=[("Book", 0)],
        )
    ],
}

# Rooms for the oracle's hand-labelled trajectories (issue 14): a mug already on the shelf at reset (a goal the agent
# can re-achieve), a pick-two with one cup already in place, a kitchen with an apple in the closed fridge.
ORACLE_SPLITS = {
    "train": [
        dict(
            task_type="pick_and_place_simple",
            obj="Apple",
            recep="CounterTop",
            receptacles=ROOM_A,
            objects=[("Mug", 1), ("Apple", 2)],
        ),
        dict(
            task_type="pick_two_obj_and_place",
            obj="Cup",
            recep="CounterTop",
            receptacles=ROOM_B,
            objects=[("Cup", 2), ("Cup", 1)],
        ),
        dict(
            task_type="pick_heat_then_place_in_recep",
            obj="Egg",
            recep="CounterTop",
            receptacles=ROOM_KITCHEN,
            objects=[("Egg", 4), ("Apple", 3)],
        ),
    ],
    "valid_seen": [],
    "valid_unseen": [],
}

if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        description="Build small real ALFWorld games offline (README's quick start)."
    )
    parser.add_argument("out", help="data root to write (pass it as --data-dir or $ALFWORLD_DATA)")
    parser.add_argument(
        "--splits",
        choices=["tiny", "put"],
        default="tiny",
        help="tiny: 6 train games of all task types, 2 + 2 valid; "
        "put: 2 + 1 + 1 two-receptacle pick-and-place games that a random agent solves in a few steps",
    )
    cli = parser.parse_args()
    out = build_games(cli.out, {"tiny": TINY_SPLITS, "put": PUT_SPLITS}[cli.splits])
    print("wrote", out, sorted(str(p) for p in out.rglob("game.tw-pddl")))
    os._exit(0)
