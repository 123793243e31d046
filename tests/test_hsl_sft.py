"""Unit tests of hsl_sft.py: the method's pieces, on real ALFWorld games built offline (end to end: test_hsl_sft_e2e.py).

The games come from tests/support/alfworld_games.py (real ALFWorld PDDL games written from what the alfworld wheel ships).
Smoke runs use the tiny random LM as the agent (it writes gibberish: no goal of its own is ever achieved) and a
scripted OpenAI-compatible relabeler (deterministic Figure 8/9 answers that name entities of the trajectory, so D'
fills from any trajectory), or SmolLM2-135M-Instruct (transformers backend, plumbing only). The oracle relabeler is
tested on scripted play of real games. Relabeling semantics (good, malformed and hostile answers) go through
`scripted_llm`.
"""

import collections
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from alfworld_answers import figure8, figure9, is_goal_inference
from alfworld_games import ORACLE_SPLITS, PUT_SPLITS, TINY_SPLITS, build_games
from alfworld_replay import verify
from runs import short_eto_prompts, tb_scalars

# `scripted_llm` (a scripted OpenAI-compatible server on 127.0.0.1) comes from conftest.py.

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "hsl_sft.py"


@pytest.fixture(scope="module")
def hsl():
    spec = importlib.util.spec_from_file_location("hsl_sft", REPO / "hsl_sft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hsl_sft"] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    return mod


def run_dir(out: Path, exp_name: str) -> Path:
    """The one run folder {run_dir}/{exp_name}__{seed}__{time} of a smoke run."""
    (path,) = out.glob(f"{exp_name}__*")
    return path


@pytest.fixture(scope="module")
def tiny_games(tmp_path_factory):
    return build_games(tmp_path_factory.mktemp("alfworld_tiny"), TINY_SPLITS)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def test_help(run_script):
    r = run_script("hsl_sft.py", "--help", timeout=60)
    for flag in (
        "--hsl-lambda",
        "--hsl-alpha",
        "--relabeler",
        "--ablation",
        "--llm-backend",
        "--resume",
    ):
        assert flag in r.output


# ----------------------------------------------------------------------------------------------------------------------
# Unit tests: weights, loss, segmentation, parsing, validation
# ----------------------------------------------------------------------------------------------------------------------
def test_demo_weight_and_buffer_sampling(hsl):
    # w_d = (n_d / T_d)^alpha * n_d
    assert hsl.demo_weight([1, 1, 0, 1], 0.8) == pytest.approx((3 / 4) ** 0.8 * 3)
    assert hsl.demo_weight([1] * 5, 0.8) == pytest.approx(5.0)
    assert hsl.demo_weight([0, 0], 0.8) == 0.0
    buf = hsl.HindsightBuffer(size=3, alpha=0.8, uniform=False)
    demos = [{"actions": ["a"] * len(z), "z": z} for z in ([1, 0], [1, 1, 1, 1], [0, 1, 1], [1, 1])]
    counts = collections.Counter()
    buf.push_all([[{"actions": ["a"], "z": [0]}]], counts)
    assert len(buf) == 0  # nothing relevant: never drawable, skipped
    buf.push_all([demos[:1], demos[1:]], counts)
    assert counts == {"pushed": 4, "dropped_no_relevant_action": 1}
    assert len(buf) == 3 and buf.items[0] is demos[1]  # FIFO: the oldest left
    w = [hsl.demo_weight(d["z"], 0.8) for d in demos[1:]]
    assert [d["weight"] for d in buf.items] == pytest.approx(w)
    import numpy as np

    draws = buf.sample(20000, np.random.default_rng(0))
    freq = collections.Counter(id(d) for d in draws)
    for d, x in zip(demos[1:], w):
        assert freq[id(d)] / 20000 == pytest.approx(x / sum(w), abs=0.02)
    uni = hsl.HindsightBuffer(size=10, alpha=0.8, uniform=True)
    uni.push_all([[dict(d) for d in demos]], collections.Counter())
    assert [d["weight"] for d in uni.items] == [1.0] * 4  # uniform ablation: P(d) = 1 / |D'|
    freq = collections.Counter(id(d) for d in uni.sample(20000, np.random.default_rng(1)))
    assert all(n / 20000 == pytest.approx(0.25, abs=0.02) for n in freq.values()) and len(freq) == 4


def test_masked_loss_matches_slow_loop(hsl):
    torch.manual_seed(0)
    B, L, V = 3, 11, 7
    logits = torch.randn(B, L, V)
    ids = torch.randint(0, V, (B, L))
    weights = torch.zeros(B, L)
    weights[0, 3:6] = 1.0  # action 1 of demo 0
    weights[0, 8:10] = 0.0  # action 2 of demo 0, labeled irrelevant (z = 0)
    weights[1, 2:4] = 1.0
    weights[1, 6:11] = 1.0
    weights[2, 5:7] = 1.0
    num_actions = torch.tensor([2.0, 2.0, 3.0])
    denom = float(B)
    loss, info = hsl.masked_sft_loss(logits, ids, weights, num_actions, denom)
    # slow, obvious loop over tokens
    total = 0.0
    for b in range(B):
        seq = 0.0
        for j in range(1, L):
            if weights[b, j] > 0:
                seq += (
                    -torch.log_softmax(logits[b, j - 1], -1)[ids[b, j]].item()
                    * weights[b, j].item()
                )
        total += seq / num_actions[b].item()
    assert loss.item() == pytest.approx(total / denom, rel=1e-5)
    assert info["tokens"] == int((weights[:, 1:] > 0).sum())


def test_eto_protocol_prefix_dialect_and_long_input(hsl, put_games, tiny_lm_dir, tmp_path):
    """Issue 14 item 1: ETO's conversation (instruction, "OK", one in-context example, then the task on the line after
    the room), one command dialect per run (the installed alfworld 0.4.2's games say "move X to Y": the prompt, the
    example and ETO-format demonstrations are converted on load), ETO's own prompt files with --eto-prompts, and ETO's
    rule for an input that outgrows the model: the episode ends there, failed."""
    ours = hsl.agent_prefix(hsl.Args(), legacy_put=False)
    assert [m["role"] for m in ours[:4]] == ["user", "assistant", "user", "assistant"] and ours[1][
        "content"
    ] == "OK"
    assert "Your task is to:" in ours[2]["content"] and ours[-1]["role"] == "assistant"
    assert "3. move {obj} to {recep}" in ours[0]["content"] and "in/on" not in ours[0]["content"]
    assert ours[-1]["content"].endswith(
        "Action: move mug 2 to coffeemachine 1"
    )  # the example's put, converted
    legacy = hsl.agent_prefix(hsl.Args(), legacy_put=True)
    assert "3. put {obj} in/on {recep}" in legacy[0]["content"]
    assert legacy[-1]["content"].endswith("Action: put mug 2 in/on coffeemachine 1")
    # --eto-prompts: ETO's folder layout (instructions/alfworld_inst.txt, icl_examples/alfworld_icl.json), read as is
    eto = tmp_path / "eto"
    (eto / "instructions").mkdir(parents=True)
    (eto / "icl_examples").mkdir()
    (eto / "instructions" / "alfworld_inst.txt").write_text(
        "INSTRUCTION\n3. put {obj} in/on {recep}"
    )
    turns = [
        {"role": "user", "content": "ROOM\n\nYour task is to: T."},
        {"from": "gpt", "content": "Action: look"},
    ]
    (eto / "icl_examples" / "alfworld_icl.json").write_text(
        json.dumps([turns, turns])
    )  # ETO uses the first one
    got = hsl.agent_prefix(hsl.Args(eto_prompts=str(eto)), legacy_put=True)
    assert [m["content"] for m in got] == [
        "INSTRUCTION\n3. put {obj} in/on {recep}",
        "OK",
        turns[0]["content"],
        "Action: look",
    ]
    assert [m["role"] for m in got] == [
        "user",
        "assistant",
        "user",
        "assistant",
    ]  # ETO's roles alternate
    msgs = hsl.demo_messages(
        got, {"intro": "ROOM 2", "instruction": "put a mug in shelf", "actions": ["look"]}
    )
    assert msgs[4] == {"role": "user", "content": "ROOM 2\nYour task is to: put a mug in shelf."}
    # ETO-format demonstrations say "put X in/on Y": converted to the games' dialect on load
    item = {
        "id": "x",
        "conversations": [{"from": "human", "value": "ROOM\nYour task is to: put a mug in shelf."}],
    }
    item["conversations"].append(
        {"from": "gpt", "value": "Thought: t\nAction: put mug 1 in/on shelf 1"}
    )
    (tmp_path / "eto.json").write_text(json.dumps([item]))
    args = hsl.Args(demos_path=str(tmp_path / "eto.json"))
    assert hsl.load_demos(args, [], legacy=False)[0]["actions"] == ["move mug 1 to shelf 1"]
    assert hsl.load_demos(args, [], legacy=True)[0]["actions"] == ["put mug 1 in/on shelf 1"]
    # over-long input: the episode ends at once (no step taken), failed; a roomy limit lets it play
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = (
        AutoTokenizer.from_pretrained(tiny_lm_dir),
        AutoModelForCausalLM.from_pretrained(tiny_lm_dir),
    )
    game = hsl.list_games(str(put_games), "train")[:1]
    short = hsl.rollout(
        game,
        (model, tok, ours),
        hsl.Args(max_seq_len=300, max_env_steps=2, agent_max_new_tokens=64),
        0.0,
    )[0]
    assert short["actions"] == [] and short["done"] and not short["won"]
    roomy = hsl.rollout(
        game,
        (model, tok, ours),
        hsl.Args(max_seq_len=8192, max_env_steps=2, agent_max_new_tokens=64),
        0.0,
    )[0]
    assert len(roomy["actions"]) == 2 and len(roomy["states"]) == 3  # two turns played


def test_rollout_follows_eto_turn_protocol(hsl, put_games, tiny_lm_dir):
    """ETO's envs/alfworld_env.py: a turn without "Action:" does not step the game and is answered with ETO's format
    error; the next prompt holds the model's own words (not a rebuilt Thought/Action); generation is capped by
    --agent-max-new-tokens."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    replies = ["Thought: where is the mug?  (no action here)", "Thought: look first.\nAction: look"]
    prompts = []
    caps = []

    def scripted_generate(input_ids, max_new_tokens, **kwargs):
        prompts.append(tok.decode(input_ids[0]))
        caps.append(max_new_tokens)
        reply = tok(replies[len(prompts) - 1], add_special_tokens=False, return_tensors="pt")[
            "input_ids"
        ]
        return torch.cat([input_ids, reply], 1)

    model.generate = scripted_generate
    prefix = hsl.agent_prefix(hsl.Args(), legacy_put=False)
    game = hsl.list_games(str(put_games), "train")[:1]
    args = hsl.Args(max_seq_len=8192, max_env_steps=2, agent_max_new_tokens=7)
    t = hsl.rollout(game, (model, tok, prefix), args, 0.0)[0]
    assert caps == [7, 7]
    assert t["observations"][0] == hsl.ETO_FORMAT_ERROR and t["actions"] == ["", "look"]
    assert t["states"][1] == t["states"][0]  # the game was not stepped
    assert t["observations"][1] != hsl.ETO_FORMAT_ERROR and t["invalid"] == 1
    assert t["outputs"] == [
        tok.decode(tok(r, add_special_tokens=False)["input_ids"]) for r in replies
    ]
    assert replies[0] in prompts[1] and "Observation: " + hsl.ETO_FORMAT_ERROR in prompts[1]


def test_encode_demo_marks_only_action_tokens(hsl, tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    demo = {
        "intro": "You are in the middle of a room.",
        "instruction": "put a mug in shelf",
        "actions": ["go to countertop 1", "take mug 1 from countertop 1", "look"],
        "observations": ["You arrive at countertop 1.", "You pick up the mug 1.", "Nothing."],
        "thoughts": None,
    }
    prefix = [{"role": "user", "content": "INSTRUCTION"}, {"role": "assistant", "content": "OK"}]
    prefix += [
        {"role": "user", "content": "EXAMPLE TASK"},
        {"role": "assistant", "content": "Action: EXAMPLE"},
    ]
    enc = hsl.encode_demo(tok, hsl.demo_messages(prefix, demo), [1, 0, 1], 10_000)
    assert enc["num_actions"] == 3
    kept = tok.decode([i for i, w in zip(enc["input_ids"], enc["weights"]) if w > 0])
    assert (
        kept == "Action: go to countertop 1<|im_end|>Action: look<|im_end|>"
    )  # z = 0 masks the middle action
    assert (
        "Observation" not in kept and "OK" not in kept and "EXAMPLE" not in kept
    )  # the prefix is never trained


def test_segmentation_at_first_achievement(hsl):
    names = ({"mug", "apple"}, {"shelf", "countertop", "cabinet"})  # (objects, receptacles)
    steps = [
        {"step": 1, "reached_goals": []},
        {"step": 2, "reached_goals": ["put a mug in shelf"]},
        {
            "step": 3,
            "reached_goals": ["put a mug in shelf", "put a toaster in shelf"],
        },  # hallucinated toaster
        {"step": 4, "reached_goals": ["put a mug in shelf", "put some apple on countertop"]},
        {
            "step": 5,
            "reached_goals": ["put a mug in shelf", "put some apple on countertop", "dance"],
        },
    ]
    c = collections.Counter()
    got = hsl.segment_goals(steps, 5, names, c)
    assert got == [
        (("pick_and_place_simple", "mug", "shelf"), 2),
        (("pick_and_place_simple", "apple", "countertop"), 4),
    ]
    assert c["goal_invalid"] == 2
    # a step the trajectory does not have (or not an integer) makes the whole answer bad: counted, nothing kept
    for bad in (99, 0, "2", 1.5, True):
        steps = [
            {"step": 1, "reached_goals": ["put a mug in shelf"]},
            {"step": bad, "reached_goals": []},
        ]
        assert hsl.segment_goals(steps, 3, names, c) == []
    assert c["goal_inference_bad_step"] == 5
    # no "step" field: the position in the list
    got = hsl.segment_goals([{}, {"reached_goals": ["put a mug in shelf"]}], 3, names, c)
    assert got == [(("pick_and_place_simple", "mug", "shelf"), 2)]


def test_oracle_goals_newly_achieved(hsl):
    base = {
        "otype": {"mug 1": "mug", "cup 1": "cup", "cup 2": "cup"},
        "rtype": {"shelf 1": "shelf", "countertop 1": "countertop"},
        "hot": [],
        "cool": [],
        "clean": [],
        "toggled": [],
        "agent_loc": "l0",
        "rloc": {},
    }
    s0 = {
        **base,
        "inrec": [["mug 1", "countertop 1"], ["cup 1", "shelf 1"], ["cup 2", "countertop 1"]],
        "holds": [],
    }
    s1 = {**base, "inrec": [["cup 1", "shelf 1"], ["cup 2", "countertop 1"]], "holds": ["mug 1"]}
    s2 = {
        **base,
        "inrec": [["mug 1", "shelf 1"], ["cup 1", "shelf 1"], ["cup 2", "countertop 1"]],
        "holds": [],
    }
    s3 = {**base, "inrec": [["mug 1", "shelf 1"], ["cup 1", "shelf 1"]], "holds": ["cup 2"]}
    s4 = {
        **base,
        "inrec": [["mug 1", "shelf 1"], ["cup 1", "shelf 1"], ["cup 2", "shelf 1"]],
        "holds": [],
    }
    s5 = {**base, "inrec": [["mug 1", "shelf 1"], ["cup 2", "shelf 1"]], "holds": ["cup 1"]}
    got = lambda states: [(g, S) for g, S, _ in hsl.oracle_goals({"states": states})]
    # facts true at reset (mug on countertop, cup 1 on shelf) are no achievements; S = the step the agent achieves a
    # goal; a cup on the shelf was true at reset, but the agent achieves it again with cup 2; pick-two needs the agent
    # to have placed both cups: not yet at step 4 (cup 1 was there at reset) ...
    mug, cup = ("pick_and_place_simple", "mug", "shelf"), ("pick_and_place_simple", "cup", "shelf")
    assert got([s0, s1, s2, s3, s4]) == [(mug, 2), (cup, 4)]
    # ... but once it took cup 1 off the shelf and put it back (step 6)
    assert got([s0, s1, s2, s3, s4, s5, s4]) == [
        (mug, 2),
        (cup, 4),
        (("pick_two_obj_and_place", "cup", "shelf"), 6),
    ]


@pytest.mark.parametrize(
    "text,ok",
    [
        ('[{"step": 1, "reached_goals": []}]', True),
        ('Sure! ```json\n[{"step": 1, "reached_goals": ["put a mug in shelf"]}]\n``` done', True),
        (
            '[{"step": 1, "reached_goals": []}, {"step": 2, "reached_goals": ["put a mug',
            False,
        ),  # cut off: no salvage
        ("[" * 50_000 + "]" * 50_000, False),  # hostile nesting: no RecursionError
        ("no json here", False),
        ('{"step": 1}', False),
        ('[{"step": 1,,}', False),
        (None, False),
    ],
)
def test_extract_json_list(hsl, text, ok):
    out = hsl.extract_json_list(text)
    assert (out is not None) == ok
    if ok:
        assert isinstance(out, list) and out[0]["step"] == 1


def test_parse_relevance(hsl):
    good = json.dumps(
        [{"step": i + 1, "is_relevant_to_goal": v} for i, v in enumerate(["yes", "no", "Yes"])]
    )
    assert hsl.parse_relevance(good, 3) == [1, 0, 1]
    assert hsl.parse_relevance(good, 4) is None  # wrong length
    assert hsl.parse_relevance('[{"is_relevant_to_goal": "maybe"}]', 1) is None
    assert hsl.parse_relevance("garbage", 1) is None


def test_validate_goal_templates(hsl):
    objects = {"mug", "desklamp", "book", "cup", "apple"}
    receptacles = {"shelf", "sinkbasin", "microwave", "countertop", "fridge"}

    def v(goal, names):
        return hsl.validate_goal(goal, *names)

    names = (objects, receptacles)
    assert v("put a mug in shelf", names) == ("pick_and_place_simple", "mug", "shelf")
    assert v("Put some mug 1 on shelf 1.", names) == ("pick_and_place_simple", "mug", "shelf")
    assert v("put a clean mug in shelf", names) == (
        "pick_clean_then_place_in_recep",
        "mug",
        "shelf",
    )
    assert v("clean some mug and put it in shelf", names) == (
        "pick_clean_then_place_in_recep",
        "mug",
        "shelf",
    )
    assert v("heat some apple and put it in countertop", names) == (
        "pick_heat_then_place_in_recep",
        "apple",
        "countertop",
    )
    assert v("put a cool apple in countertop", names) == (
        "pick_cool_then_place_in_recep",
        "apple",
        "countertop",
    )
    assert v("find two cups and put them in shelf", names) == (
        "pick_two_obj_and_place",
        "cup",
        "shelf",
    )
    assert v("look at book under the desk lamp", names) == (
        "look_at_obj_in_light",
        "book",
        "desklamp",
    )
    assert v("examine the book with the desklamp", names) == (
        "look_at_obj_in_light",
        "book",
        "desklamp",
    )
    assert v("examine the book with the shelf", names) is None  # not a light
    assert v("put a toaster in shelf", names) is None  # hallucinated object
    assert v("put a mug in garbagecan", names) is None  # hallucinated receptacle
    assert v("make coffee", names) is None  # no template
    # the type check (issue 25): an object must be an object of the game, a receptacle a receptacle
    assert v("put a countertop in shelf", names) is None  # a receptacle as the object
    assert v("put a mug in cup", names) is None  # an object as the receptacle
    assert v("put two countertops in shelf", names) is None
    assert v("heat some microwave and put it in fridge", names) is None
    assert v("look at book under the shelf", names) is None  # the light must be a lamp object
    assert v("look at book under the desklamp", (objects - {"desklamp"}, receptacles)) is None
    assert v("put two mugs in shelf", names) == ("pick_two_obj_and_place", "mug", "shelf")


def test_agent_output_parsing_and_dialects(hsl):
    # ETO's rule: the action is what follows the first "Action:", unchanged; none without one
    assert hsl.parse_agent_output("Thought: find it\nAction: go to shelf 1") == (
        "find it",
        "go to shelf 1",
    )
    assert hsl.parse_agent_output("Action:go to shelf 1\n") == (None, "go to shelf 1")
    assert hsl.parse_agent_output("Thought: hm\naction: go to shelf 1") == (
        "hm\naction: go to shelf 1",
        None,
    )
    assert hsl.parse_agent_output('"go to desk 1"') == (None, None)
    assert hsl.to_dialect("put mug 1 in/on shelf 1", legacy_put=False) == "move mug 1 to shelf 1"
    assert hsl.to_dialect("put mug 1 in shelf 1", legacy_put=False) == "move mug 1 to shelf 1"
    assert hsl.to_dialect("move mug 1 to shelf 1", legacy_put=True) == "put mug 1 in/on shelf 1"
    assert hsl.to_dialect("go to shelf 1", legacy_put=True) == "go to shelf 1"


# ----------------------------------------------------------------------------------------------------------------------
# Real ALFWorld games: AlfredTWEnv, expert demos, oracle relabeling, both command dialects
# ----------------------------------------------------------------------------------------------------------------------
def test_alfworld_expert_demos_and_oracle(hsl, tiny_games, tmp_path):
    train = hsl.list_games(str(tiny_games), "train")
    assert len(train) == len(TINY_SPLITS["train"])
    assert len(hsl.list_games(str(tiny_games), "valid_unseen")) == len(TINY_SPLITS["valid_unseen"])
    won = [hsl.expert_demo(g, 40) for g in train]
    solved = [d for d in won if d is not None]
    assert len(solved) >= len(train) - 1  # the hand-coded expert sometimes wanders on pick-two
    for d in solved:
        assert d["actions"] and len(d["actions"]) == len(d["observations"]) == len(d["z"])
    # ETO round trip: expert demos written as ETO's ShareGPT file load back through the ETO loader
    path = tmp_path / "demos.json"
    turn = lambda who, text: {"from": who, "value": text}
    path.write_text(
        json.dumps(
            [
                {
                    "id": "x",
                    "conversations": [
                        turn("human", f"{d['intro']}\n\nYour task is to: {d['instruction']}.")
                    ]
                    + [
                        t
                        for a, o in zip(d["actions"], d["observations"])
                        for t in (turn("gpt", f"Action: {a}"), turn("human", f"Observation: {o}"))
                    ],
                }
                for d in solved
            ]
        )
    )
    back = hsl.load_eto_demos(str(path))
    assert [b["actions"] for b in back] == [d["actions"] for d in solved]
    assert [b["instruction"] for b in back] == [d["instruction"] for d in solved]

    # scripted play on the mug->shelf game: an uninstructed goal first, then the instructed one
    game_file = next(g for g in train if "Mug-None-Shelf" in g)
    args = hsl.Args(max_env_steps=40, relabeler="oracle")
    game = hsl.ALFWorldGame(game_file)
    intro, instruction, gs = game.reset()
    traj = {
        "intro": intro,
        "instruction": instruction,
        "actions": [],
        "observations": [],
        "states": [hsl.summarize_facts(gs["facts"])],
        "won": False,
    }
    plan = [
        "go to diningtable 1",
        "take apple 1 from diningtable 1",
        "go to countertop 1",
        "move apple 1 to countertop 1",
        "take mug 1 from countertop 1",
        "go to shelf 1",
        "move mug 1 to shelf 1",
    ]
    for a in plan:
        obs, won, done, gs = game.step(a)
        traj["actions"].append(a)
        traj["observations"].append(obs)
        traj["states"].append(hsl.summarize_facts(gs["facts"]))
        traj["won"] = won
    assert traj["won"]
    goals = [(goal, S) for goal, S, _ in hsl.oracle_goals(traj)]
    assert goals == [
        (("pick_and_place_simple", "apple", "countertop"), 4),
        (("pick_and_place_simple", "mug", "shelf"), 7),
    ]
    relabeled = hsl.relabel([traj], args, collections.Counter())[0]
    assert [d["instruction"] for d in relabeled] == [
        "put a apple in countertop",
        "put a mug in shelf",
    ]
    assert relabeled[0]["z"] == [1, 1, 1, 1]
    assert relabeled[1]["z"] == [
        0,
        0,
        1,
        0,
        1,
        1,
        1,
    ]  # the apple detour is irrelevant to the mug goal
    # both relabels replayed on games of this room whose goal is the relabeled one: won exactly at S, and with the
    # z = 1 actions alone; the check catches a late S and a needed action marked irrelevant
    room = next(s for s in TINY_SPLITS["train"] if (s["obj"], s["recep"]) == ("Mug", "Shelf"))
    for i, (goal, S, facts) in enumerate(hsl.oracle_goals(traj)):
        z = hsl.oracle_relevance(traj, facts, S)
        check = verify(hsl, room, traj, goal, S, z, tmp_path, i)
        assert check["exact"] and check["relevant_won"], check
    assert not verify(hsl, room, traj, goal, S + 1, z + [1], tmp_path, 8)["exact"]
    dropped = [
        1,
        1,
        1,
        0,
        1,
        1,
        1,
    ]  # "move apple 1 to countertop 1" marked irrelevant for the apple goal
    goal, S, facts = hsl.oracle_goals(traj)[0]
    assert not verify(hsl, room, traj, goal, S, dropped[:S], tmp_path, 9)["relevant_won"]
    # the failure-only ablation keeps nothing from this successful trajectory
    failure_only = hsl.Args(relabeler="oracle", ablation="relabel_failure")
    assert hsl.relabel([traj], failure_only, collections.Counter()) == [[]]


@pytest.fixture(scope="module")
def oracle_games(tmp_path_factory):
    return sorted(
        str(p)
        for p in build_games(tmp_path_factory.mktemp("oracle"), ORACLE_SPLITS).rglob("*.tw-pddl")
    )


def play(hsl, game_file: str, plan: list[str]) -> dict:
    """A trajectory of scripted commands on a real game (each one admissible), as rollout() records it."""
    game = hsl.ALFWorldGame(game_file)
    intro, instruction, gs = game.reset()
    traj = dict(intro=intro, instruction=instruction, actions=[], observations=[], won=False)
    traj["states"] = [hsl.summarize_facts(gs["facts"])]
    for a in plan:
        assert a in game.state["admissible_commands"], (a, game.state["admissible_commands"])
        obs, traj["won"], _, gs = game.step(a)
        traj["actions"].append(a)
        traj["observations"].append(obs)
        traj["states"].append(hsl.summarize_facts(gs["facts"]))
    return traj


def test_oracle_labels_what_figure8_asks(hsl, oracle_games):
    """Issue 14 item 2 on hand-labelled trajectories of real games: goals the agent achieved (a goal true at reset
    counts once re-achieved; pick-two once the agent placed both objects), and z = the actions the goal depends on
    (the walks, openings, takes and puts on its causal chain; exploration, examine / look / inventory are not)."""
    game = lambda key: next(g for g in oracle_games if key in g)
    goals = lambda traj: [(g, S) for g, S, _ in hsl.oracle_goals(traj)]
    z = lambda traj, goal: next(
        hsl.oracle_relevance(traj, facts, S) for g, S, facts in hsl.oracle_goals(traj) if g == goal
    )
    # the mug is on the shelf at reset: taking it off and putting it back achieves "put a mug in shelf"
    t = play(
        hsl,
        game("Apple-None-CounterTop"),
        ["go to shelf 1", "take mug 1 from shelf 1", "move mug 1 to shelf 1"],
    )
    mug = ("pick_and_place_simple", "mug", "shelf")
    assert goals(t) == [(mug, 3)] and z(t, mug) == [1, 1, 1]
    # pick-two with cup 1 already on the countertop: one put achieves a put, not the pick-two ...
    plan = [
        "go to shelf 1",
        "take cup 2 from shelf 1",
        "go to countertop 1",
        "move cup 2 to countertop 1",
    ]
    put, two = (
        ("pick_and_place_simple", "cup", "countertop"),
        ("pick_two_obj_and_place", "cup", "countertop"),
    )
    assert goals(play(hsl, game("Cup-None-CounterTop"), plan)) == [(put, 4)]
    # ... placing cup 1 again (taken off, put back) does
    t = play(
        hsl,
        game("Cup-None-CounterTop"),
        plan + ["take cup 1 from countertop 1", "move cup 1 to countertop 1"],
    )
    assert goals(t) == [(put, 4), (two, 6)] and z(t, put) == [1] * 4 and z(t, two) == [1] * 6
    # heat the egg, with a fruitless look into the fridge, inventory / examine / look on the way
    plan = [
        "go to fridge 1",
        "open fridge 1",
        "close fridge 1",
        "go to shelf 1",
        "take egg 1 from shelf 1",
    ]
    plan += [
        "inventory",
        "examine egg 1",
        "go to microwave 1",
        "heat egg 1 with microwave 1",
        "look",
    ]
    t = play(
        hsl,
        game("Egg-None-CounterTop"),
        plan + ["go to countertop 1", "move egg 1 to countertop 1"],
    )
    heat, put = (
        ("pick_heat_then_place_in_recep", "egg", "countertop"),
        ("pick_and_place_simple", "egg", "countertop"),
    )
    assert t["won"] and sorted(goals(t)) == [(put, 12), (heat, 12)]
    assert z(t, heat) == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1]
    assert z(t, put) == [
        0,
        0,
        0,
        1,
        1,
        0,
        0,
        0,
        0,
        0,
        1,
        1,
    ]  # heating is not needed to put the egg there
    # the apple is in the closed fridge: opening it is relevant, closing it afterwards is not
    plan = [
        "go to microwave 1",
        "go to fridge 1",
        "open fridge 1",
        "take apple 1 from fridge 1",
        "close fridge 1",
    ]
    t = play(
        hsl,
        game("Egg-None-CounterTop"),
        plan + ["go to countertop 1", "move apple 1 to countertop 1"],
    )
    apple = ("pick_and_place_simple", "apple", "countertop")
    assert goals(t) == [(apple, 7)] and z(t, apple) == [0, 1, 1, 1, 0, 1, 1]


def test_alfworld_legacy_put_dialect(hsl, tmp_path):
    root = build_games(tmp_path / "legacy", {"train": PUT_SPLITS["train"][:1]}, legacy_put=True)
    g = hsl.list_games(str(root), "train")[0]
    game = hsl.ALFWorldGame(g)
    assert game.legacy_put
    game.reset()
    for a in ["go to countertop 1", "take mug 1 from countertop 1", "go to shelf 1"]:
        game.step(a)
    cmd = hsl.to_dialect("move mug 1 to shelf 1", game.legacy_put)
    assert cmd == "put mug 1 in/on shelf 1" and cmd in game.state["admissible_commands"]
    assert game.step(cmd)[1]  # won
    assert hsl.expert_demo(g, 40) is not None  # the 0.4.2 expert's "move" is translated


def test_load_eto_format(hsl, tmp_path):
    item = {
        "id": "alfworld_0",
        "conversations": [
            {
                "from": "human",
                "value": "Interact with a household to solve a task. Your task is to: (described below). "
                "Use the format\nThought: ...\nAction: ...",
            },
            {"from": "gpt", "value": "OK"},
            {
                "from": "human",
                "value": "You are in the middle of a room. Looking quickly around you, you see a cabinet 1."
                "\nYour task is to: put some mug on cabinet.",
            },
            {"from": "gpt", "value": "Thought: I need a mug.\nAction: go to cabinet 1"},
            {"from": "human", "value": "Observation: On the cabinet 1, you see a mug 1."},
            {"from": "gpt", "value": "Action: take mug 1 from cabinet 1"},
            {"from": "human", "value": "Observation: You pick up the mug 1 from the cabinet 1."},
            {"from": "gpt", "value": "Thought: now put it.\nAction: put mug 1 in/on cabinet 1"},
        ],
    }
    path = tmp_path / "eto.json"
    path.write_text(json.dumps([item]))
    (d,) = hsl.load_eto_demos(str(path))
    assert d["instruction"] == "put some mug on cabinet"
    assert d["intro"].startswith("You are in the middle of a room.")
    assert d["actions"] == [
        "go to cabinet 1",
        "take mug 1 from cabinet 1",
        "put mug 1 in/on cabinet 1",
    ]
    assert d["thoughts"] == ["I need a mug.", None, "now put it."]
    assert d["observations"][:2] == [
        "On the cabinet 1, you see a mug 1.",
        "You pick up the mug 1 from the cabinet 1.",
    ]
    # issue 25: turns that do not alternate (two gpt turns, then two human turns) pair actions with the wrong
    # observations: one error line naming the file and the conversation, not a silent misaligned demo
    turns = item["conversations"]
    swapped = {"id": "b", "conversations": turns[:4] + [turns[5], turns[4], turns[6], turns[7]]}
    path.write_text(json.dumps([item, swapped]))
    with pytest.raises(
        SystemExit, match=r"eto\.json: conversation 1: turns must alternate human, gpt"
    ):
        hsl.load_eto_demos(str(path))
    # and a file nested too deep for the JSON decoder: one line too
    path.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(SystemExit, match=r"eto\.json: not ETO format \(RecursionError"):
        hsl.load_eto_demos(str(path))


# ----------------------------------------------------------------------------------------------------------------------
# LLM relabeling semantics through a scripted OpenAI-compatible endpoint (tests/support/scripted_llm.py)
# ----------------------------------------------------------------------------------------------------------------------
ROOM = "You are in the middle of a room. Looking quickly around you, you see a countertop 1, and a shelf 1."


def mug_traj(room: str = ROOM) -> dict:
    """take mug 1 from the countertop, put it on the shelf: one goal achieved at step 2 (the oracle's states too)."""
    s0 = {
        "otype": {"mug 1": "mug"},
        "rtype": {"shelf 1": "shelf", "countertop 1": "countertop"},
        "hot": [],
        "cool": [],
        "clean": [],
        "toggled": [],
        "agent_loc": "l0",
        "rloc": {},
        "holds": [],
        "inrec": [["mug 1", "countertop 1"]],
    }
    return {
        "intro": room,
        "instruction": "put a cup in shelf",
        "actions": ["take mug 1 from countertop 1", "move mug 1 to shelf 1"],
        "observations": [
            "You pick up the mug 1 from the countertop 1.",
            "You move the mug 1 to the shelf 1.",
        ],
        "won": False,
        "gamefile": "g",
        "states": [
            s0,
            {**s0, "inrec": [], "holds": ["mug 1"]},
            {**s0, "inrec": [["mug 1", "shelf 1"]]},
        ],
    }


def relabel_prompts(hsl) -> dict:
    names = ("goal_inference", "goal_inference_user", "action_relevance", "action_relevance_user")
    return {n: hsl.read_prompt(f"alfworld_{n}.md") for n in names}


def scripted_client(hsl, server, **kw):
    return hsl.LLMClient(
        hsl.Args(
            llm_backend="openai",
            llm_base_url=server.base_url,
            llm_model=server.model,
            llm_timeout=5,
            **kw,
        )
    )


def test_llm_relabeling_scripted_answers_fill_d_prime(hsl, scripted_llm):
    """Figure 8/9-style answers -> the segment up to S(I'_k), relabeled with the achieved goal, masked by z, in D'."""
    scripted_llm.respond = lambda m: (
        figure8({2: ["put some mug 1 on shelf 1"]}, 2)
        if is_goal_inference(m)
        else figure9(["no", "yes"])
    )
    counters = collections.Counter()
    (demos,) = hsl.relabel(
        [mug_traj()], hsl.Args(), counters, scripted_client(hsl, scripted_llm), relabel_prompts(hsl)
    )
    (d,) = demos
    assert (
        d["instruction"] == "put a mug in shelf"
        and d["actions"] == mug_traj()["actions"]
        and d["z"] == [0, 1]
    )
    assert d["source"] == "hindsight" and d["thoughts"] is None
    assert (
        (counters["tp"], counters["fp"], counters["fn"]) == (1, 0, 0)
        and counters["goals_found"] == 1
        and counters["relevance_calls"] == 1
    )
    # the goal-inference prompt shows the trajectory, not the original instruction; relevance gets S(I'_k) and the goal
    goal_msgs, rel_msgs = scripted_llm.requests
    assert (
        "move mug 1 to shelf 1" in goal_msgs[1]["content"]
        and "put a cup" not in goal_msgs[1]["content"]
    )
    assert (
        "Goal: put a mug in shelf" in rel_msgs[1]["content"]
        and "each of the 2 steps" in rel_msgs[1]["content"]
    )
    assert "Location: shelf 1" in rel_msgs[1]["content"]
    buf = hsl.HindsightBuffer(10, 0.8, uniform=False)
    buf.push_all([demos], counters)
    assert len(buf) == 1 and buf.items[0]["weight"] == pytest.approx(0.5**0.8)


def test_llm_relabeling_rejects_goals_of_the_wrong_types(hsl, scripted_llm):
    """Issue 25: goals are type-checked against the game's PDDL facts. "put a countertop in shelf" (a receptacle as
    the object) and "put a mug in mug" (an object as the receptacle) name entities the trajectory shows, but are no
    goal: counted as invalid, never in D'; the valid goal of the same answer is kept."""
    goals = ["put a countertop in shelf", "put a mug in mug", "put some mug 1 on shelf 1"]
    scripted_llm.respond = lambda m: (
        figure8({2: goals}, 2) if is_goal_inference(m) else figure9(["no", "yes"])
    )
    counters = collections.Counter()
    (demos,) = hsl.relabel(
        [mug_traj()], hsl.Args(), counters, scripted_client(hsl, scripted_llm), relabel_prompts(hsl)
    )
    assert [d["instruction"] for d in demos] == ["put a mug in shelf"]
    assert counters["goal_invalid"] == 2 and counters["relevance_calls"] == 1


def test_llm_relabeling_bad_answers_are_counted_and_dropped(hsl, scripted_llm, capsys):
    """Malformed JSON, goals outside the templates or naming unseen objects, hostile/huge answers, HTTP 500 and
    unusable relevance answers: each counted, nothing enters D', no traceback."""
    answers = {
        "room A": '[{"step": 1, "reached_goals": ["put a mug in shelf"]},, {"step": 2',  # malformed
        "room B": figure8(
            {1: ["make coffee", "put a toaster in shelf", {"goal": 1}, "x" * 10_000]}, 2
        ),  # not goals
        "room C": "[" * 50_000 + "]" * 50_000,  # hostile nesting
        "room D": "[" + "9" * 100_000 + "]",  # a number too large to parse
        "room E": 500,  # server error (retried by the client, then a counted failure)
        "room F": "x" * 10_000_000,  # huge: cut to a bounded size by the client
        "room G": figure8({2: ["put a mug in shelf"]}, 2),  # a good goal ...
    }

    def respond(messages):
        if not is_goal_inference(messages):
            return '[{"step": 1, "is_relevant_to_goal": "maybe"}]'  # ... whose relevance answer is unusable
        return next(a for room, a in answers.items() if room in messages[1]["content"])

    scripted_llm.respond = respond
    trajs = [mug_traj(ROOM.replace("a room", room)) for room in answers]
    client = scripted_client(hsl, scripted_llm, llm_max_new_tokens=8192, llm_concurrency=4)
    counters = collections.Counter()
    out = hsl.relabel(trajs, hsl.Args(), counters, client, relabel_prompts(hsl))
    assert out == [[]] * len(answers)
    assert counters["goal_inference_calls"] == 7 and counters["goal_inference_failed_request"] == 1
    assert counters["goal_inference_bad_json"] == 4  # A, C, D, F
    # B: four non-goals in the running lists of both steps
    assert (
        counters["goal_invalid"] == 2 * 4
        and counters["relevance_unusable"] == 1
        and client.failures == 1
    )
    assert counters["tp"] == 1 and counters["fn"] == 6  # only G named the achieved goal
    assert "Traceback" not in capsys.readouterr().out
    scripted_llm.respond = lambda m: answers["room F"]
    (huge,) = client.chat([[{"role": "user", "content": "room F"}]])
    assert len(huge) == 16 * 8192  # bounded, whatever the server sends


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(hsl, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    for data_dir in (
        None,
        str(tmp_path),
    ):  # unset (and no $ALFWORLD_DATA), or a folder without json_2.1.1
        with pytest.raises(SystemExit) as e:
            hsl.check_args(hsl.Args(data_dir=data_dir))
        assert (
            e.value.code == 2
            and "--data-dir: must be a folder with json_2.1.1" in capsys.readouterr().err
        )
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SystemExit, match="ETO format"):
        hsl.load_eto_demos(str(bad))
    bad.write_text(json.dumps([{"id": "x", "turns": []}]))
    with pytest.raises(SystemExit, match="conversations"):
        hsl.load_eto_demos(str(bad))
    bad.write_text("{broken")
    with pytest.raises(SystemExit, match="ETO format"):
        hsl.load_eto_demos(str(bad))
    args = hsl.Args(llm_backend="openai", llm_base_url="http://127.0.0.1:9/v1", llm_timeout=3)
    with pytest.raises(SystemExit, match="no OpenAI-compatible server answers"):
        hsl.LLMClient(args)


def test_memory_check_rejects_flags_that_cannot_fit(hsl, tiny_lm_dir, monkeypatch, capsys):
    """Issue 25 item 1: --micro-batch-size x --max-seq-len x the vocabulary (fp32 logits), plus the weights and AdamW's
    state, is checked against the device's memory as soon as load_learner has the agent (before anything else it does:
    its other arguments are never touched): one `error:` line, exit status 2. The tests' own flags pass, with and
    without LoRA."""
    big = hsl.Args(
        model_name=str(tiny_lm_dir), micro_batch_size=65536, batch_size=65536, max_seq_len=65536
    )
    agent = hsl.load_agent(big)
    monkeypatch.setattr(hsl, "load_agent", lambda args: agent)
    capsys.readouterr()  # (transformers' loading bar)
    with pytest.raises(SystemExit) as e:
        hsl.load_learner(big, None, [], {}, None, None, None)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert re.fullmatch(
        r"error: --micro-batch-size x --max-seq-len: .* needs [\d.]+ GiB, this machine has [\d.]+ GiB .*",
        err[0],
    )
    monkeypatch.undo()
    # run_main's flags, then the defaults: no exit
    for flags in (dict(micro_batch_size=1, batch_size=1, max_seq_len=2048), {}):
        for use_lora in (False, True):
            args = hsl.Args(model_name=str(tiny_lm_dir), use_lora=use_lora, **flags)
            hsl.check_memory(args, hsl.load_agent(args)[1])


# ----------------------------------------------------------------------------------------------------------------------
# Runs in this process (main() with a command line): checkpoints during SFT, a non-finite loss
# ----------------------------------------------------------------------------------------------------------------------
def run_main(hsl, monkeypatch, put_games, tiny_lm_dir, out, *flags):
    """hsl.main() on the put games with the tiny LM: SFT only (2 demos, batch 1: 2 steps an epoch), no HSL, a final
    evaluation of one step per game."""
    argv = [
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        "--relabeler",
        "oracle",
        "--run-dir",
        out,
    ]
    argv += ["--eto-prompts", short_eto_prompts(), "--num-demos", "2", "--batch-size", "1"]
    argv += [
        "--micro-batch-size",
        "1",
        "--hsl-steps",
        "0",
        "--eval-every",
        "0",
        "--max-env-steps",
        "1",
    ]
    argv += [
        "--agent-max-new-tokens",
        "4",
        "--max-seq-len",
        "2048",
        "--learning-rate",
        "1e-3",
        "--seed",
        "2",
    ]
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, argv + list(flags))])
    hsl.main()


def test_sft_checkpoints_resume_exactly(hsl, monkeypatch, put_games, tiny_lm_dir, tmp_path):
    """Issue 25 item 5: SFT saves a checkpoint every SFT_CHECKPOINT_EVERY steps, so that a run killed mid-SFT resumes
    there: the resumed run's SFT losses, gradient norms and learning rates equal the uninterrupted run's, bit for bit.
    A damaged checkpoint file is one error line."""
    monkeypatch.setattr(hsl, "SFT_CHECKPOINT_EVERY", 2)
    out = tmp_path / "runs"
    run_main(
        hsl, monkeypatch, put_games, tiny_lm_dir, out, "--sft-epochs", "3", "--exp-name", "whole"
    )
    whole = run_dir(out, "whole")
    assert sorted(p.name for p in (whole / "checkpoints").iterdir()) == [
        "final",
        "sft",
        "sft_2",
        "sft_4",
    ]
    ckpt = whole / "checkpoints" / "sft_2"
    assert json.loads((ckpt / "hsl_state.json").read_text())["sft_steps"] == 2
    flags = ["--sft-epochs", "3", "--exp-name", "resumed", "--resume", ckpt]
    run_main(hsl, monkeypatch, put_games, tiny_lm_dir, out, *flags)
    resumed = run_dir(out, "resumed")
    for tag in ("sft/loss", "losses/grad_norm", "charts/learning_rate"):
        assert (
            len(tb_scalars(whole, tag)) == 6
            and tb_scalars(resumed, tag) == tb_scalars(whole, tag)[2:]
        ), tag
    # a checkpoint damaged since (a truncated state file): one line naming it, exit status 1
    state = ckpt / "hsl_state.json"
    state.write_text(state.read_text()[:20])
    with pytest.raises(SystemExit) as e:
        run_main(
            hsl,
            monkeypatch,
            put_games,
            tiny_lm_dir,
            out,
            *flags[:2],
            "--exp-name",
            "bad",
            "--resume",
            ckpt,
        )
    assert re.fullmatch(
        r"error: .*sft_2: not a complete checkpoint \(JSONDecodeError: .*", e.value.code
    ), e.value


def test_non_finite_loss_stops_before_any_checkpoint(
    hsl, monkeypatch, put_games, tiny_lm_dir, tmp_path
):
    """Issue 25 item 4: a NaN loss (here: the SFT loss times NaN) stops the run at that step with one line, before the
    update, and no checkpoint of corrupt weights is written."""
    masked_sft_loss = hsl.masked_sft_loss

    def nan_loss(*args):
        loss, info = masked_sft_loss(*args)
        return loss * float("nan"), info

    monkeypatch.setattr(hsl, "masked_sft_loss", nan_loss)
    out = tmp_path / "runs"
    with pytest.raises(SystemExit) as e:
        run_main(
            hsl, monkeypatch, put_games, tiny_lm_dir, out, "--sft-epochs", "1", "--exp-name", "nan"
        )
    assert re.fullmatch(
        r"error: step 1: loss is nan \(gradient norm nan\); stopped .*", e.value.code
    ), e.value
    assert not list(out.glob("*/checkpoints"))
