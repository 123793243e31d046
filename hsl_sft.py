"""Hindsight Supervised Learning (HSL) on top of SFT for an LLM agent on ALFWorld.

Paper: "Spinning Straw into Gold: Relabeling LLM Agent Trajectories in Hindsight for Successful
Demonstrations" (HSL), Sections 3.2-3.4, Appendix C (prompts, Figures 8-9) and F (hyperparameters).

SFT of a Hugging Face agent on ground-truth demonstrations (ALFWorld's expert or an ETO-format
file), then the HSL loop (Section 3.2): roll out b train instructions, relabel each trajectory with
the goals it achieved (Section 3.3: an auxiliary LLM, Figures 8-9, or the PDDL oracle) into a FIFO
buffer D', one step on L_HSL (Eq. 3-4). Evaluation per task type (Figure 5), with ETO's protocol.
--resume continues exactly (save_checkpoint). Long-form notes: docs/hsl_sft.md.

    # the relabeler (Section 4.1)
    vllm serve meta-llama/Llama-3.3-70B-Instruct --tensor-parallel-size 8 --port 8000
    python hsl_sft.py --model-name meta-llama/Llama-3.2-1B-Instruct --num-demos 800 --use-lora
    # oracle relabeler; Figure 4 ablations
    python hsl_sft.py --relabeler oracle --ablation no_mask
    # data parallel: each process takes its share
    accelerate launch --multi_gpu --num_processes 4 hsl_sft.py ...
"""

# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "numpy==2.4.6",
#     "torch==2.13.0",
#     "transformers==5.19.0",
#     "accelerate==1.15.0",
#     "peft==0.21.2",
#     "openai==3.54.0",
#     "alfworld==0.4.2",
#     "tyro==1.0.17",
#     "tensorboard==2.21.0",
#     "tqdm==4.70.1",
# ]
# ///

import collections
import concurrent.futures
import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import string
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from accelerate import Accelerator, PartialState
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, get_scheduler

TASK_TYPES = [
    "pick_and_place_simple",
    "look_at_obj_in_light",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
    "pick_two_obj_and_place",
]
# Figure 5's names
TASK_SHORT = dict(zip(TASK_TYPES, ["put", "examine", "clean", "heat", "cool", "puttwo"]))
PROMPTS_DIR = Path(__file__).resolve().parent / "prompts" / "hsl"
# Rarely tuned, fixed here (Appendix F follows ETO / FastChat where the paper is silent):
HSL_EPOCHS = 3.0  # length of HSL with --hsl-steps -1 ("all runs lasted 3 epochs")
WARMUP_RATIO = 0.03  # cosine schedule after warm-up
WEIGHT_DECAY = 0.0  # AdamW
MAX_GRAD_NORM = 1.0  # gradient clipping
# --use-lora (ours; the paper fine-tunes fully): rank and dropout; alpha = 2 * rank
LORA_R = 16
LORA_DROPOUT = 0.05
# SFT checkpoints every this many steps (a kill mid-SFT resumes there; at the paper's scale, about
# an epoch)
SFT_CHECKPOINT_EVERY = 100
# the hand-coded expert must win a train game within this many steps to give a demonstration
EXPERT_MAX_STEPS = 60
# ETO's observation for a turn without "Action:" (envs/alfworld_env.py, verbatim): no game step
ETO_FORMAT_ERROR = "Error Input. Your input must contains 'Action: '"
# in ETO's eval_agent/prompt
ETO_INST = "instructions/alfworld_inst.txt"
ETO_ICL = "icl_examples/alfworld_icl.json"


# === Arguments ====================================================================================
@dataclass
class Args:
    """Hindsight Supervised Learning on ALFWorld: SFT on expert demonstrations, then an LLM
    relabels the agent's own trajectories with the goals they achieved (masked, reweighted SFT).
    Defaults are the paper's scale (Llama-3.2-1B, 3,200 demonstrations, a 70B relabeler: GPUs,
    hours); README's quick start runs on a CPU."""

    exp_name: str = Path(__file__).stem
    """the name of this experiment (part of each run folder's name)"""
    seed: int = 1
    """seed of the experiment (the paper uses 42, 123 and 2026)"""
    track: bool = False
    """log to Weights & Biases as well (imported only when set; $WANDB_ENTITY picks the team)"""
    wandb_project_name: str = "llm-relabeling"
    """the W&B project name"""
    run_dir: str = "runs"
    """TensorBoard logs, checkpoints and summary.json go to {run_dir}/{run name}"""
    # --- environment (ALFWorld) and demonstrations ---
    data_dir: Optional[str] = None
    """ALFWorld data root holding json_2.1.1/{train,valid_seen,valid_unseen}
    (unset: $ALFWORLD_DATA)"""
    max_env_steps: int = 40
    """episode step limit T (Section 4.1: T = 40 on ALFWorld)"""
    num_demos: int = 3200
    """cap on ground-truth demonstrations (the paper's sample-efficiency study uses
    800 to 3,200)"""
    demos_path: Optional[str] = None
    """ETO-format (ShareGPT) JSON of demonstrations; unset: ALFWorld's hand-coded expert plays
    the train games"""
    # --- agent ---
    model_name: str = "meta-llama/Llama-3.2-1B-Instruct"
    """agent model: hub id or local Hugging Face folder (Appendix F: Llama-3.2-1B-Instruct)"""
    use_lora: bool = False
    """LoRA (peft, all linear layers) instead of full fine-tuning"""
    max_seq_len: int = 4096
    """training sequences are cut to this many tokens; a rollout whose prompt outgrows it ends
    there (ETO's rule)"""
    agent_max_new_tokens: int = 512
    """new tokens per agent turn (ETO's max_new_tokens: 512); a turn cut before "Action:" gets
    ETO's format error as its observation"""
    eto_prompts: Optional[str] = None
    """ETO's eval_agent/prompt folder (commit a2fc5da) to prompt the agent with ETO's own
    instruction and example"""
    rollout_temperature: float = 1.0
    """sampling temperature of training rollouts (a_t ~ pi_theta, Section 3.2); 0 = greedy"""
    # --- SFT (Appendix F, following ETO) ---
    learning_rate: float = 2e-5
    """AdamW learning rate (cosine schedule, 3% warm-up)"""
    batch_size: int = 32
    """demonstrations per optimisation step, from D_train and (HSL) from D'"""
    micro_batch_size: int = 4
    """sequences per forward/backward pass (gradient accumulation up to the batch)"""
    sft_epochs: float = 3.0
    """epochs of SFT on the ground-truth demonstrations before HSL (paper: 3, Appendix F; hours on
    a GPU at the paper's scale)"""
    # --- HSL (Sections 3.2-3.4, 4.1) ---
    hsl_steps: int = -1
    """HSL optimisation steps (-1: 3 passes over the ground-truth demos at batch_size;
    0: SFT only)"""
    rollouts_per_step: int = 18
    """b: train instructions rolled out and relabeled per HSL step (paper: 18)"""
    buffer_size: int = 100
    """N: the relabeled buffer D' is a FIFO queue of this size"""
    hsl_lambda: float = 0.3
    """lambda in Eq. 4: weight of L_D' against L_SFT"""
    hsl_alpha: float = 0.8
    """alpha in w_d = (n_d / T_d)^alpha * n_d"""
    ablation: Literal["none", "relabel_failure", "uniform_weight", "no_mask"] = "none"
    """Figure 4: relabel only the final goal of failed trajectories / uniform buffer weights /
    no irrelevant-action masking"""
    relabeler: Literal["llm", "oracle"] = "llm"
    """llm: the auxiliary LLM of Section 3.3; oracle: goals and relevance from the PDDL facts
    (beyond the paper)"""
    # --- LLM client (the same seven flags in every script) ---
    llm_backend: Literal["openai", "transformers"] = "openai"
    """openai: any OpenAI-compatible endpoint (`vllm serve`, SGLang, llama.cpp, \
`transformers serve`, hosted; key from $OPENAI_API_KEY); transformers: the model in \
this process (offline runs with small local models)"""
    llm_model: str = "meta-llama/Llama-3.3-70B-Instruct"
    """model name sent to the endpoint, or (transformers) a hub id or local folder"""
    llm_base_url: str = "http://localhost:8000/v1"
    """base URL of the OpenAI-compatible endpoint"""
    llm_timeout: float = 600.0
    """seconds per request (openai; two retries on timeouts and server errors)"""
    llm_max_new_tokens: int = 4096
    """maximum new tokens per answer"""
    llm_temperature: float = 0.0
    """sampling temperature (0: greedy)"""
    llm_concurrency: int = 18
    """requests in flight (openai), or the generation batch size (transformers)"""
    # --- evaluation, checkpoints ---
    eval_every: int = 50
    """evaluate and checkpoint every this many HSL steps (and after SFT); 0: only at the end"""
    resume: Optional[str] = None
    """checkpoint folder to resume from ({run_dir}/{run name}/checkpoints/...)"""


# Declared range [low, high] (inclusive) of every int and float flag: what a real run could need.
# NaN and +-inf fail every range. A new numeric field needs an entry here (tests/test_bad_inputs.py
# fails otherwise).
RANGES = [
    # seeds: what NumPy, torch and the OpenAI API all accept (a count here only bounds a loop)
    (0, 2**32 - 1, ["seed", "eval_every"]),
    (
        1,
        2**16,
        [
            "max_env_steps",
            "rollouts_per_step",
            "llm_concurrency",
            "batch_size",
            "micro_batch_size",
            "buffer_size",
            "num_demos",
            "max_seq_len",
            "agent_max_new_tokens",
            "llm_max_new_tokens",
        ],
    ),
    (-1, 10**9, ["hsl_steps"]),  # -1: HSL_EPOCHS passes over D_train
    (0.0, 1000.0, ["sft_epochs"]),
    (0.0, 1.0, ["hsl_lambda"]),
    (0.0, 10.0, ["hsl_alpha", "rollout_temperature", "llm_temperature"]),
    (1e-9, 1.0, ["learning_rate"]),
    (1.0, 86400.0, ["llm_timeout"]),  # seconds per request
]


def check_args(args):
    """Usage errors as one line (`error: --flag: ...`) before anything heavy; sets --data-dir."""
    args.data_dir = args.data_dir or os.environ.get("ALFWORLD_DATA")  # ALFWorld's own default
    hub_id = re.fullmatch(r"[\w-][\w.-]*(/[\w.-]+)?", args.model_name) and not os.path.exists(
        args.model_name
    )
    checks = [  # (field, valid?, what it must be); `low <= v <= high` also rejects NaN
        *[
            (name, low <= getattr(args, name) <= high, f"in [{low}, {high}]")
            for low, high, names in RANGES
            for name in names
        ],
        (
            "max_seq_len",
            args.max_seq_len > args.agent_max_new_tokens,
            f"> --agent-max-new-tokens ({args.agent_max_new_tokens})",
        ),
        (
            "data_dir",
            os.path.isdir(os.path.join(args.data_dir or "", "json_2.1.1")),
            "a folder with json_2.1.1",
        ),
        (
            "demos_path",
            args.demos_path is None or os.path.isfile(args.demos_path),
            "an existing file",
        ),
        (
            "eto_prompts",
            not args.eto_prompts or os.path.isfile(f"{args.eto_prompts}/{ETO_ICL}"),
            "ETO's prompt folder",
        ),
        ("model_name", os.path.isdir(args.model_name) or hub_id, "a local folder or a hub id"),
        (
            "resume",
            not args.resume or os.path.isfile(os.path.join(args.resume, "hsl_state.json")),
            "a checkpoint",
        ),
    ]
    for name, ok, what in checks:  # a usage error: exit status 2 as argparse (data errors exit 1)
        if not ok:
            print(
                f"error: --{name.replace('_', '-')}: must be {what}, got {getattr(args, name)}",
                file=sys.stderr,
            )
            raise SystemExit(2)
    # {run_dir} must be creatable and writable (exit 1 otherwise): a folder is made, then removed,
    # in its nearest existing parent; nothing is left behind
    parent = Path(args.run_dir).absolute()
    while not parent.exists():
        parent = parent.parent
    with data_error("--run-dir", f"cannot create or write {args.run_dir}"):
        os.rmdir(tempfile.mkdtemp(dir=parent))


@contextlib.contextmanager
def data_error(path, what):
    """A guard around the reading of a user-given file: a defect of its content (not UTF-8, not
    JSON, nested too deep, the wrong structure; a damaged checkpoint) becomes one line naming the
    file, exit status 1, never a traceback."""
    try:
        yield
    # RuntimeError: RecursionError (deep nesting) and torch.load's damaged archives; LookupError:
    # KeyError, IndexError
    except (OSError, ValueError, RuntimeError, TypeError, LookupError) as e:
        raise SystemExit(f"error: {path}: {what} ({type(e).__name__}: {str(e)[:200]})")


# === Method: hindsight relabeling (Section 3.3) ===================================================
# A trajectory / demonstration is a plain dict (JSON-able, so D' can be checkpointed): intro
# (room description), instruction, actions [T], observations [T] (o_{t+1} after a_t), thoughts [T]
# or None, z [T] relevance labels (1 for ground truth), task_type, source ("expert" / "eto" /
# "hindsight"); rollouts add won and the PDDL states.
_W = r"([a-z][a-z ]*?)"
_IN = r"(?:in|on|into|onto|in/on)"
_THE = r"(?:the |a |an )?"
_A = r"(?:a |an |some |the )?"
# The six goal templates of ALFWorld, both phrasings each (alfworld/gen/goal_library.py, Figure 8).
# Order matters: the specific templates are tried before plain pick-and-place.
GOAL_PATTERNS = [
    ("pick_two_obj_and_place", rf"^(?:put|place) two {_W}s? {_IN} {_THE}{_W}$"),
    ("pick_two_obj_and_place", rf"^find two {_W}s? and put them {_IN} {_THE}{_W}$"),
    ("pick_clean_then_place_in_recep", rf"^put {_A}clean {_W} {_IN} {_THE}{_W}$"),
    ("pick_clean_then_place_in_recep", rf"^clean {_A}{_W} and put it {_IN} {_THE}{_W}$"),
    ("pick_heat_then_place_in_recep", rf"^put {_A}hot {_W} {_IN} {_THE}{_W}$"),
    ("pick_heat_then_place_in_recep", rf"^heat {_A}{_W} and put it {_IN} {_THE}{_W}$"),
    ("pick_cool_then_place_in_recep", rf"^put {_A}(?:cool|cold) {_W} {_IN} {_THE}{_W}$"),
    ("pick_cool_then_place_in_recep", rf"^cool {_A}{_W} and put it {_IN} {_THE}{_W}$"),
    ("look_at_obj_in_light", rf"^look at {_A}{_W} under {_THE}{_W}$"),
    ("look_at_obj_in_light", rf"^examine {_A}{_W} (?:with|under) {_THE}{_W}$"),
    ("pick_and_place_simple", rf"^put {_A}{_W} {_IN} {_THE}{_W}$"),
]
GOAL_TEXT = dict(
    zip(
        TASK_TYPES,
        [
            "put a {o} in {r}",
            "look at {o} under the {r}",
            "put a clean {o} in {r}",
            "put a hot {o} in {r}",
            "put a cool {o} in {r}",
            "put two {o} in {r}",
        ],
    )
)
LAMPS = {"desklamp", "floorlamp"}


def goal_text(goal):
    """(task_type, obj, recep) -> the instruction I'_k."""
    return GOAL_TEXT[goal[0]].format(o=goal[1], r=goal[2])


def validate_goal(goal, objects, receptacles):
    """(task_type, obj, recep) of a goal (a string) that matches one of the six templates and names
    entities of the game in their roles (game_entities), else None."""
    # longer: no template instance (and slow regexes)
    if len(goal) > 200:
        return None
    g = re.sub(r"\s+", " ", re.sub(r"\b\d+\b", "", goal.lower())).strip(".\"' ")

    def singular(w, known):  # "mugs" -> "mug" where only "mug" is known
        return w[:-1] if w not in known and w.endswith("s") and w[:-1] in known else w

    for task_type, pattern in GOAL_PATTERNS:  # the first template that matches decides
        if m := re.match(pattern, g):
            # the type check: "put a countertop in shelf" names a receptacle as the object; the
            # "receptacle" of examine is a lamp, an object of the game
            where = objects & LAMPS if task_type == "look_at_obj_in_light" else receptacles
            obj = singular(m[1].replace(" ", ""), objects)
            recep = singular(m[2].replace(" ", ""), where)
            return (task_type, obj, recep) if obj in objects and recep in where else None
    return None


def state_facts(state):
    """A state's facts: ("in", obj, recep), ("holds"/"hot"/"cool"/"clean"/"toggled", obj),
    ("opened", recep), ("at", loc)."""
    facts = {("in", o, r) for o, r in state["inrec"]} | {("at", state["agent_loc"])}
    return facts | {
        (k, x)
        for k in ("hot", "cool", "clean", "holds", "toggled", "opened")
        for x in state.get(k, [])
    }


def goal_instances(state):
    """(goal, the facts that make it hold) for every way a goal holds in a state (ALFWorld's goal
    library definitions)."""
    otype = state["otype"]
    rtype = state["rtype"]
    out = []
    flagged = (("clean", TASK_TYPES[2]), ("hot", TASK_TYPES[3]), ("cool", TASK_TYPES[4]))
    placed = sorted((o, r) for o, r in state["inrec"] if o in otype and r in rtype)
    for o, r in placed:
        out.append((("pick_and_place_simple", otype[o], rtype[r]), frozenset({("in", o, r)})))
        out += [
            ((tt, otype[o], rtype[r]), frozenset({("in", o, r), (k, o)}))
            for k, tt in flagged
            if o in state[k]
        ]
    for (o, r), (o2, r2) in itertools.combinations(placed, 2):
        if r == r2 and otype[o] == otype[o2]:
            facts = frozenset({("in", o, r), ("in", o2, r)})
            out.append((("pick_two_obj_and_place", otype[o], rtype[r]), facts))
    for o in state["holds"]:  # examine: holding the object where a lamp is switched on
        for lamp in state["toggled"]:
            where = state["rloc"].get(dict(state["inrec"]).get(lamp))
            if o in otype and lamp in otype and where == state["agent_loc"] is not None:
                facts = frozenset({("holds", o), ("toggled", lamp), ("at", where)})
                out.append((("look_at_obj_in_light", otype[o], otype[lamp]), facts))
    return out


def oracle_goals(traj):
    """(goal, S, facts) per goal the agent achieved (Figure 8): S = the first step it holds by
    facts the agent made true and kept (all its `in` facts, at least one): a goal true at reset
    counts once re-achieved; pick-two, both placed."""
    first = {}
    made = set()
    prev = state_facts(traj["states"][0])
    for t, state in enumerate(traj["states"][1:], 1):
        cur = state_facts(state)
        made = (made & cur) | (cur - prev)
        for g, facts in sorted(goal_instances(state), key=str):
            if g not in first and facts & made and all(f in made for f in facts if f[0] == "in"):
                first[g] = (t, facts)
        prev = cur
    return sorted(((g, t, facts) for g, (t, facts) in first.items()), key=lambda x: x[1])


def action_needs(action, state):
    """The facts an ALFWorld command relies on in `state`: its object where it is (held or in its
    receptacle), the agent where the receptacle (or lamp) is, the receptacle open if it is; `go to`
    relies on nothing."""
    names = re.findall(r"\b[a-z]+ \d+\b", action)
    if not names or action.startswith("go to"):
        return set()
    facts = state_facts(state)
    where = dict(state["inrec"])
    receps = {n for n in names if n in state["rloc"]} | {where[n] for n in names[:1] if n in where}
    needs = {("at", state["rloc"].get(r)) for r in receps}
    needs |= {("opened", r) for r in receps if ("opened", r) in facts}
    return needs | {f for f in facts if f[0] in ("in", "holds") and f[1] == names[0]}


def oracle_relevance(traj, facts, S):
    """Oracle z_{1:S} (beyond the paper): walking back from S, an action is relevant iff it made
    true a fact the goal relies on (`facts`: those it holds by at S, from oracle_goals, computed
    once per trajectory) or a later relevant action relies on (action_needs); exploration,
    examine / look / inventory: z = 0."""
    needed = set(facts)
    z = [0] * S
    for u in range(S - 1, -1, -1):
        made = state_facts(traj["states"][u + 1]) - state_facts(traj["states"][u])
        if made & needed:
            z[u] = 1
            needed = (needed - made) | action_needs(traj["actions"][u], traj["states"][u])
    return z


def extract_json_list(text):
    """The JSON list in an LLM answer (code fences stripped, json.loads of the outermost [...]),
    else None."""
    text = re.sub(r"```(?:json)?", "", text or "")
    try:  # no "[...]" leaves an empty string: a JSON error too
        out = json.loads(text[text.find("[") : text.rfind("]") + 1])
    except (ValueError, RecursionError):  # malformed, or hostile (huge numbers, deep nesting)
        return None
    return out if isinstance(out, list) else None


def format_trajectory(traj, S=None, labels=None):
    """A trajectory (segment) as the relabeler reads it: Step k: Action / Observation (+ Figure 8's
    Location / Inventory)."""
    text = f"Initial observation: {traj['intro']}\n"
    for t in range(len(traj["actions"]) if S is None else S):
        text += (
            f"\nStep {t + 1}:\nAction: {traj['actions'][t]}\n"
            f"Observation: {traj['observations'][t]}\n"
        )
        lab = labels[t] if labels and t < len(labels) and isinstance(labels[t], dict) else {}
        if "location" in lab:  # the answer is untrusted: bounded, and only ever shown as text
            text += (
                f"Location: {str(lab['location'])[:200]}\n"
                f"Inventory: {str(lab.get('inventory'))[:200]}\n"
            )
    return text.rstrip("\n")


def chat_turns(prompts, name, **fields):
    """A relabeler request: the system prompt (Figure 8 or 9), then our user turn with the
    trajectory."""
    return [
        {"role": "system", "content": prompts[name]},
        {"role": "user", "content": string.Template(prompts[f"{name}_user"]).substitute(**fields)},
    ]


def game_entities(traj):
    """(objects, receptacles): the types of the trajectory's game by its PDDL facts ("mug" for
    "mug 1"), the only names a goal may use, each in its role (validate_goal)."""
    state = traj["states"][0]
    return set(state["otype"].values()), set(state["rtype"].values())


def segment_goals(steps, T, names, counters):
    """Segmentation at S(I'_k) from a Figure 8 answer: the first step whose `reached_goals` holds
    the (valid) goal."""
    first = {}
    for pos, st in enumerate(steps[:T]):
        if not isinstance(st, dict):
            continue
        step = st.get("step", pos + 1)
        if not (type(step) is int and 1 <= step <= T):
            # a step the trajectory does not have: the answer is bad
            counters["goal_inference_bad_step"] += 1
            return []
        reached = st.get("reached_goals")
        if isinstance(reached, str):
            reached = [reached]
        elif not isinstance(reached, list):
            reached = []
        for g in dict.fromkeys(map(str, reached)):  # each distinct goal once per step
            canon = validate_goal(g, *names)
            counters["goal_invalid"] += canon is None
            if canon is not None:
                first.setdefault(canon, step)
    return list(first.items())


def llm_goals(traj, answer, counters):
    """The goals M says one trajectory achieved (Figure 8), with S(I'_k), and its per-step labels
    (None: a failed request or no JSON list, counted)."""
    step_labels = extract_json_list(answer)
    bad = "goal_inference_failed_request" if answer is None else "goal_inference_bad_json"
    counters.update({"goal_inference_calls": 1, bad: step_labels is None})
    goals = segment_goals(step_labels or [], len(traj["actions"]), game_entities(traj), counters)
    return goals, step_labels


def parse_relevance(text, S):
    """z_{1:S} from a Figure 9 answer; None unless it is a list of exactly S steps with yes/no
    labels."""
    items = extract_json_list(text) or []
    labels = [
        str(it.get("is_relevant_to_goal")).strip().lower() for it in items if isinstance(it, dict)
    ]
    yes_no = set(labels) <= {"yes", "no", "true", "false"}
    if len(labels) != len(items) or len(items) != S or not yes_no:
        return None
    return [int(v in ("yes", "true")) for v in labels]


def llm_relevance(trajs, jobs, step_labels, client, prompts, counters):
    """z_{1:S} from M (Figure 9), one request per (trajectory i, goal g, S) in `jobs`, each showing
    the segment with Figure 8's labels; None where the answer is unusable."""
    convs = []
    for i, g, S in jobs:
        convs.append(
            chat_turns(
                prompts,
                "action_relevance",
                goal=goal_text(g),
                num_steps=S,
                trajectory=format_trajectory(trajs[i], S, step_labels[i]),
            )
        )
    answers = client.chat(convs) if convs else []
    labels = [parse_relevance(ans, S) for ans, (_, _, S) in zip(answers, jobs)]
    counters.update(relevance_calls=len(labels), relevance_unusable=sum(z is None for z in labels))
    return labels


def last_goal(goals, traj):
    """Figure 4's relabel_failure ablation: failed trajectories only, their final achieved goal
    only."""
    return [max(goals, key=lambda g: g[1])] if goals and not traj["won"] else []


def score_goals(goals, truth, counters):
    """Counts the relabeler's goals against the oracle's (true / false positives, misses)."""
    pred = {g for g, _ in goals}
    true = {g for g, _ in truth}
    counters.update(
        tp=len(pred & true),
        fp=len(pred - true),
        fn=len(true - pred),
        goals_found=len(goals),
        trajectories_without_goal=not goals,
    )


def precision_recall(counts):
    """Precision and recall of the LLM's validated goals against the oracle's (NaN when
    undefined)."""
    tp = counts["tp"]
    # precision tp / (tp + fp), recall tp / (tp + fn)
    return [tp / n if n else math.nan for n in (tp + counts["fp"], tp + counts["fn"])]


def relabel(trajs, args, counters, client=None, prompts=None):
    """Section 3.3: one hindsight demo per goal I'_k a trajectory achieved, cut at S(I'_k), masked
    by z. "llm": M's goals (Figure 8) and z (Figure 9), bad answers counted and skipped, scored
    against the oracle's goals; "oracle": goals and z from the PDDL facts."""
    if args.relabeler == "llm":
        answers = client.chat(
            [chat_turns(prompts, "goal_inference", trajectory=format_trajectory(t)) for t in trajs]
        )
    found = []
    step_labels = []
    goal_facts = []
    for i, traj in enumerate(trajs):
        oracle = oracle_goals(traj)  # once per trajectory
        goal_facts.append({g: facts for g, _, facts in oracle})
        goals = truth = [(g, S) for g, S, _ in oracle]
        if args.relabeler == "llm":
            goals, steps = llm_goals(traj, answers[i], counters)
            step_labels.append(steps)
        if args.ablation == "relabel_failure":
            goals = last_goal(goals, traj)
            truth = last_goal(truth, traj)
        score_goals(goals, truth, counters)
        found.append(goals)
    jobs = [(i, g, S) for i, goals in enumerate(found) for g, S in goals]
    if args.relabeler == "oracle":
        labels = [oracle_relevance(trajs[i], goal_facts[i][g], S) for i, g, S in jobs]
    else:  # one relevance request per (trajectory, goal); an unusable answer drops the goal
        labels = llm_relevance(trajs, jobs, step_labels, client, prompts, counters)
    out = [[] for _ in trajs]
    for (i, g, S), z in zip(jobs, labels):  # (tau_S(k), I'_k, z_1:S(k))
        if z is None:
            continue
        t = trajs[i]
        # the agent's thoughts are dropped: they reasoned about the original instruction
        out[i].append(
            dict(
                intro=t["intro"],
                instruction=goal_text(g),
                thoughts=None,
                z=z,
                source="hindsight",
                goal=g,
                actions=t["actions"][:S],
                observations=t["observations"][:S],
                task_type=g[0],
                gamefile=t.get("gamefile"),
            )
        )
    return out


# === Method: hindsight buffer D' and demonstration weights (Section 3.4) ==========================
def demo_weight(z, alpha):
    """w_d = (n_d / T_d)^alpha * n_d (Section 3.4): n_d relevant actions out of T_d; optimality x
    difficulty."""
    n = sum(z)
    return (n / len(z)) ** alpha * n  # (a hindsight demo has S >= 1 steps)


class HindsightBuffer:
    """D': FIFO queue of size N (Section 4.1); sampling with P(d) = w_d / sum w (Eq. 3), uniform
    under the ablation."""

    def __init__(self, size, alpha, uniform):
        self.items = collections.deque(maxlen=size)
        self.alpha = alpha
        self.uniform = uniform

    def push_all(self, relabeled, counters):
        """Append the relabeled demos in order (the oldest drop out); those with w_d = 0 could never
        be drawn: skipped."""
        new = [d for demos in relabeled for d in demos if sum(d["z"]) > 0]
        for d in new:
            d["weight"] = 1.0 if self.uniform else demo_weight(d["z"], self.alpha)
        self.items.extend(new)
        counters.update(
            pushed=len(new), dropped_no_relevant_action=sum(map(len, relabeled)) - len(new)
        )

    def sample(self, k, rng):
        w = np.array([d["weight"] for d in self.items])
        idx = rng.choice(len(self.items), size=k, p=w / w.sum())  # (with replacement)
        return [self.items[i] for i in idx]

    def __len__(self):
        return len(self.items)


# === Learner: masked SFT loss and the HSL update (Eq. 3-4), data parallel through accelerate ======
def masked_sft_loss(logits, input_ids, weights, num_actions, denom):
    """Eq. 3 (z = 1: the SFT term of Eq. 4): sum_b (1/T_b) sum_t z_t * -log P(a_t) / denom.
    weights (batch, seq): z_t on a_t's tokens; denom = the *full* batch size, so that
    gradient-accumulated micro-batches add up to the batch loss."""
    logits = logits[:, :-1].float()  # (batch, seq-1, vocab): position j predicts token j+1
    nll = F.cross_entropy(
        logits.transpose(1, 2), input_ids[:, 1:], reduction="none"
    )  # (batch, seq-1)
    w = weights[:, 1:]
    per_seq = (nll * w).sum(-1)  # (batch,)
    return (per_seq / num_actions).sum() / denom, {"tokens": w.gt(0).sum().item()}


def shard(items, accelerator):
    """This process's share of a global list (every process draws the same global batches from the
    same seed)."""
    return items[accelerator.process_index :: accelerator.num_processes]


def unshard(mine, accelerator):
    """The inverse of shard(): every process gets the whole list, in the global order (whatever the
    process count)."""
    W = accelerator.num_processes
    r = accelerator.process_index
    # (the global positions are distinct: sorting never compares the items themselves)
    return [x for _, x in sorted(gather_object([(r + W * i, x) for i, x in enumerate(mine)]))]


def micro_batches(batch, size, coef, model, accelerator, sync=True):
    """(items, coef) micro-batches of this process's share; one all-reduce (the last, if `sync`);
    none: a zero gradient."""
    mine = shard(batch, accelerator)
    chunks = [(mine[i : i + size], coef) for i in range(0, len(mine), size)] or [(batch[:1], 0.0)]
    for j, chunk in enumerate(chunks):
        with (
            contextlib.nullcontext()
            if sync and j == len(chunks) - 1
            else accelerator.no_sync(model)
        ):
            yield chunk


def accumulate_loss(model, batch, coef, args, accelerator, prefix, pad_id, sync=True):
    """Forward/backward this process's share of a global batch (coef * loss into .grad); the global
    loss and tokens."""
    W = accelerator.num_processes
    # DDP averages gradients over the W processes: dividing by W makes that average the global
    # batch's gradient
    denom = len(batch) / W
    loss_sum = 0.0
    tokens = 0
    for items, c in micro_batches(batch, args.micro_batch_size, coef, model, accelerator, sync):
        mb = collate(items, pad_id, accelerator.device)
        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
        loss, info = masked_sft_loss(
            logits, mb["input_ids"], mb["weights"], mb["num_actions"], denom
        )
        accelerator.backward(c * loss)
        if c:  # (an empty share's stand-in micro-batch counts nothing)
            loss_sum += loss.item()
            tokens += info["tokens"]
    # per-process sums -> the global batch (each process's loss is W times its share of it, see
    # denom)
    stats = torch.tensor([loss_sum / W, tokens], dtype=torch.float64, device=accelerator.device)
    stats = accelerator.reduce(stats, reduction="sum").tolist()
    return {f"{prefix}/loss": stats[0], f"{prefix}/tokens": stats[1]}


def optimizer_step(model, optimizer, scheduler, accelerator, loss):
    """Clip, step, schedule, zero; returns the gradient norm before clipping and the learning
    rate. A NaN or infinite loss or gradient (a learning rate too high, bad data) stops the run
    before the update, with one line: no checkpoint of corrupt weights is ever written."""
    grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM))
    if not math.isfinite(loss + grad_norm):  # (finite iff both are)
        raise SystemExit(
            f"error: step {scheduler.last_epoch + 1}: loss is {loss} (gradient norm {grad_norm}); "
            "stopped before this update: lower the learning rate?"
        )
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {
        "losses/grad_norm": grad_norm,
        "charts/learning_rate": scheduler.get_last_lr()[0],
    }


def hsl_update(model, optimizer, scheduler, buffer, sft_batch, agent, args, accelerator, rng):
    """One step on L_HSL = lambda L_D' + (1 - lambda) L_SFT (Eq. 4); D' drawn with P(d) ~ w_d;
    empty D': an SFT step."""
    _, tokenizer, prefix = agent
    pad = tokenizer.pad_token_id
    sft_coef = 1.0 - args.hsl_lambda if len(buffer) else 1.0
    info = {}
    if len(buffer):
        batch = []
        for d in buffer.sample(args.batch_size, rng):
            z = [1] * len(d["z"]) if args.ablation == "no_mask" else d["z"]  # Figure 4's no_mask
            batch.append(encode_demo(tokenizer, demo_messages(prefix, d), z, args.max_seq_len))
        # sync=False: one gradient all-reduce per optimisation step, after L_SFT
        info.update(
            accumulate_loss(
                model, batch, args.hsl_lambda, args, accelerator, "hsl", pad, sync=False
            )
        )
    info.update(accumulate_loss(model, sft_batch, sft_coef, args, accelerator, "sft", pad))
    loss = sft_coef * info["sft/loss"] + args.hsl_lambda * info.get("hsl/loss", 0.0)
    info["losses/hsl_total"] = loss
    return {**info, **optimizer_step(model, optimizer, scheduler, accelerator, loss)}


def make_scheduler(optimizer, num_steps, saved=None):
    """Linear warm-up, then cosine decay over one phase (ETO / FastChat's recipe; the paper is
    silent)."""
    sched = get_scheduler("cosine", optimizer, int(WARMUP_RATIO * num_steps), max(num_steps, 1))
    # resuming inside this phase: the schedule's position, and the learning rate it had set
    if saved:
        sched.load_state_dict(saved)
        for group, lr in zip(optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    return sched


def demo_batches(num_demos, batch_size, seed):
    """Batches of D_train indices, epoch after epoch, each in a fresh random order (an epoch's last
    may be short)."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(num_demos).tolist()
        yield from (order[i : i + batch_size] for i in range(0, num_demos, batch_size))


# === Environment and data =========================================================================
# ALFWorld games, the agent's chat format and action tokens, rollouts, and the demonstrations
# D_train (ALFWorld's hand-coded expert, or ETO's ShareGPT file).
def list_games(data_dir, split):
    """Game files of one split, collected and filtered (solvable, six task types) by alfworld's own
    AlfredTWEnv."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    # only AlfredTWEnv's file collection is used; the config is built here (the wheel ships no
    # base_config.yaml)
    mode, key = {
        "train": ("train", "data_path"),
        "valid_seen": ("eval_in_distribution", "eval_id_data_path"),
        "valid_unseen": ("eval_out_of_distribution", "eval_ood_data_path"),
    }[split]
    config = {
        "env": {"goal_desc_human_anns_prob": 0.0, "task_types": [1, 2, 3, 4, 5, 6]},
        "dataset": {
            key: os.path.join(data_dir, "json_2.1.1", split),
            "num_train_games": -1,
            "num_eval_games": -1,
        },
    }
    # alfworld reads each game's traj_data.json; os.walk order is filesystem-dependent: sort
    with data_error(data_dir, "cannot read ALFWorld's game files"):
        games = sorted(AlfredTWEnv(config, mode).game_files)
    if not games:
        raise SystemExit(
            f"error: --data-dir {data_dir}: no solvable games under json_2.1.1/{split}"
        )
    return games


def to_dialect(cmd, legacy_put):
    """Map a put command to the game's dialect: alfworld>=0.4 says "move X to Y", older data "put X
    in/on Y"."""
    m = re.match(r"^(?:move (.+?) to|put (.+?) (?:in/on|in|on|into|onto)) (.+)$", cmd)
    if not m:
        return cmd
    obj = m.group(1) or m.group(2)
    return f"put {obj} in/on {m.group(3)}" if legacy_put else f"move {obj} to {m.group(3)}"


def summarize_facts(facts):
    """Compact, JSON-able view of the PDDL state (demangled names, e.g. "mug 1") used by the oracle
    relabeler."""
    flags = dict(
        ishot="hot",
        iscool="cool",
        isclean="clean",
        istoggled="toggled",
        holds="holds",
        opened="opened",
    )
    s = {"otype": {}, "rtype": {}, "rloc": {}, "agent_loc": None}
    s.update({k: [] for k in ["inrec", *flags.values()]})
    for p in facts:
        args = [a.name.strip() for a in p.arguments]
        name = p.name.lower()
        if name in ("objecttype", "receptacletype"):
            s["otype" if name == "objecttype" else "rtype"][args[0]] = (
                args[1].replace("type", "").strip()
            )
        elif name == "inreceptacle":
            s["inrec"].append(args)
        elif name in flags:  # holds(agent, obj); the others take the object alone
            s[flags[name]].append(args[-1])
        elif name == "atlocation" and args[0].startswith("agent"):
            s["agent_loc"] = args[1]
        elif name == "receptacleatlocation":
            s["rloc"][args[0]] = args[1]
    return s


class ALFWorldGame:
    """One ALFWorld game: AlfredTWEnv.init_env's wrappers around a PddlEnv that also reports the
    PDDL facts (oracle)."""

    def __init__(self, gamefile, expert=False):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import (
            AlfredDemangler,
            AlfredExpert,
            AlfredInfos,
        )
        from textworld.envs import PddlEnv

        self.gamefile = gamefile
        traj_data = json.loads(Path(gamefile).with_name("traj_data.json").read_text())
        self.task_type = traj_data["task_type"]
        env = PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True, facts=True))
        env = AlfredInfos(AlfredDemangler(env))  # (names not shuffled: the default)
        self.env = AlfredExpert(env, expert_type="handcoded") if expert else env
        self.env.load(gamefile)
        # data older than alfworld 0.4: the grammar's put template is "put {o} in/on {r}"
        self.legacy_put = "put {o} in/on {r}" in Path(gamefile).read_text()

    def reset(self):
        """(room description, task, game state)"""
        self.state = self.env.reset()
        text = self.state["feedback"].replace("-= Welcome to TextWorld, ALFRED! =-", "")
        intro, _, task = text.partition("Your task is to:")
        return intro.strip(), task.strip().rstrip("."), self.state

    def step(self, cmd):
        """(observation, won, done, game state)"""
        self.state, _, done = self.env.step(cmd)
        return self.state["feedback"].strip(), bool(self.state["won"]), bool(done), self.state


# loaded games by file, reused across rollouts (loading parses the PDDL)
GAME_POOL = collections.defaultdict(list)


def read_prompt(name):
    """Prompt body after the header's `---` line (prompt file convention of this repository)."""
    return (PROMPTS_DIR / name).read_text().split("\n---\n", 1)[1].strip()


def agent_prefix(args, legacy_put):
    """ETO's conversation before the task (prompt_with_icl, "conversation", one example):
    instruction, "OK", the example; ours (prompts/hsl/) or ETO's (--eto-prompts); put in the run's
    dialect ("put X in/on Y" = 0.4's "move X to Y")."""

    def read(eto, ours):
        return Path(args.eto_prompts, eto).read_text() if args.eto_prompts else read_prompt(ours)

    with data_error(args.eto_prompts or PROMPTS_DIR, "not ETO's prompt folder"):
        inst = read(ETO_INST, "alfworld_agent.md")
        icl = json.loads(read(ETO_ICL, "alfworld_icl.md"))[0]
        if not legacy_put:
            inst = inst.replace("put {obj} in/on {recep}", "move {obj} to {recep}")
        turns = [{"role": "user", "content": inst}, {"role": "assistant", "content": "OK"}]
        for j, turn in enumerate(icl):
            text = re.sub(
                r"(?<=Action: )(.*)", lambda m: to_dialect(m[1], legacy_put), turn["content"]
            )
            turns.append({"role": ("user", "assistant")[j % 2], "content": text})
    return turns


def parse_agent_output(text):
    """(thought, action) by ETO's rule (envs/alfworld_env.py): the action follows the first
    "Action:" (else None)."""
    action = re.search(r"Action:\s?(.*)", text.strip(), re.S)
    thought = re.search(r"Thought:\s*(.*?)\s*(?:Action:|$)", text, re.S)
    thought = (thought.group(1) or None) if thought else None
    return thought, action.group(1).strip() if action else None


def demo_messages(prefix, demo, with_last_obs=False):
    """A trajectory in ETO's conversation: prefix, task (room, newline, "Your task is to: ..."),
    Action / Observation."""
    msgs = prefix + [
        {"role": "user", "content": f"{demo['intro']}\nYour task is to: {demo['instruction']}."}
    ]
    T = len(demo["actions"])
    thoughts = demo.get("thoughts") or [None] * T
    outputs = demo.get("outputs")  # a rollout's own words (ETO's history); demos: rebuilt
    for t in range(T):
        act = (f"Thought: {thoughts[t]}\n" if thoughts[t] else "") + f"Action: {demo['actions'][t]}"
        msgs.append({"role": "assistant", "content": outputs[t] if outputs else act})
        if t < T - 1 or with_last_obs:
            msgs.append({"role": "user", "content": f"Observation: {demo['observations'][t]}"})
    return msgs


def encode_demo(tokenizer, messages, demo_z, max_len):
    """Token ids + weights: action t's tokens (content, end of turn) get z_t (located via prefix
    renders), others 0."""
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(prefix)):
            raise ValueError(
                "the agent's chat template is not prefix-stable; cannot locate action tokens"
            )
        # content + end-of-turn marker, not the trailing newline
        spans.append((len(prefix), len(upto.rstrip())))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    weights = [0.0] * len(ids)
    # the prefix's assistant turns ("OK", the example) are never trained
    z = [0.0] * (len(spans) - len(demo_z)) + demo_z
    k = 0
    for j, (s, _) in enumerate(enc["offset_mapping"]):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1]:
            weights[j] = z[k]
    return {"input_ids": ids[:max_len], "weights": weights[:max_len], "num_actions": len(demo_z)}


def collate(batch, pad_id, device):
    """Right-pad a list of encoded demos into tensors."""

    def pad(key, fill):
        return torch.nn.utils.rnn.pad_sequence([torch.tensor(b[key]) for b in batch], True, fill)

    out = dict(
        input_ids=pad("input_ids", pad_id),
        attention_mask=(pad("input_ids", -1) >= 0).long(),  # 1 on a demo's tokens, 0 on the padding
        weights=pad("weights", 0.0).float(),
        num_actions=torch.tensor([max(b["num_actions"], 1.0) for b in batch]),
    )
    return {k: v.to(device) for k, v in out.items()}


def load_agent(args):
    """Tokenizer + causal LM (bfloat16 on GPU), full fine-tuning or LoRA; --resume: the checkpoint's
    weights/adapter."""
    weights = args.resume if args.resume and not args.use_lora else args.model_name
    # a folder or hub id that holds no model: a data error naming it
    with data_error(weights, "cannot load a tokenizer and causal LM"):
        tokenizer = AutoTokenizer.from_pretrained(args.resume or args.model_name)
        model = AutoModelForCausalLM.from_pretrained(
            weights, dtype=torch.bfloat16 if torch.cuda.is_available() else None
        )
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    if args.use_lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if args.resume:
            return tokenizer, PeftModel.from_pretrained(model, args.resume, is_trainable=True)
        cfg = LoraConfig(
            r=LORA_R, lora_alpha=2 * LORA_R, lora_dropout=LORA_DROPOUT, target_modules="all-linear"
        )
        model = get_peft_model(model, cfg)
    return tokenizer, model


def check_memory(args, model):
    """Usage error when one training micro-batch cannot fit in the device's memory (a GPU's, else
    the RAM); called before the model moves there."""
    # Ours (the paper is silent). What the flags allow a step to need, counting only what is
    # certainly allocated: a micro-batch (at most --batch-size sequences) padded to --max-seq-len
    # tokens, which HSL's relabeled trajectories reach (a rollout ends only when its prompt
    # outgrows it); the weights; for the trainable ones (all without --use-lora) gradients and
    # AdamW's two moments, as many bytes each; the fp32 logits of masked_sft_loss and
    # cross_entropy's fp32 log-softmax, 8 bytes per sequence x position x vocabulary entry.
    # Activations and the KV cache come on top. Under DDP each process holds one such micro-batch.
    need = sum(p.nbytes * (1 + 3 * p.requires_grad) for p in model.parameters())
    need += (
        min(args.micro_batch_size, args.batch_size) * args.max_seq_len * model.config.vocab_size * 8
    )
    have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if torch.cuda.is_available():
        have = torch.cuda.mem_get_info()[1]
    if need > have:
        print(
            f"error: --micro-batch-size x --max-seq-len: one micro-batch needs {need / 2**30:.1f} "
            f"GiB, this machine has {have / 2**30:.1f} GiB (weights, optimiser, fp32 logits of a "
            f"{model.config.vocab_size}-token vocabulary at --max-seq-len)",
            file=sys.stderr,
        )
        raise SystemExit(2)


@torch.no_grad()
def rollout(gamefiles, agent, args, temperature, desc="rollout"):
    """Play the games in parallel (one batched generate per step), keeping every PDDL state."""
    model, tokenizer, prefix = agent
    sample = dict(do_sample=False, temperature=None, top_p=None, top_k=None)  # greedy
    if temperature > 0:
        sample = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    games = [GAME_POOL[g].pop() if GAME_POOL[g] else ALFWorldGame(g) for g in gamefiles]
    model.eval()
    trajs = []
    for game in games:
        intro, instruction, gs = game.reset()
        trajs.append(
            dict(
                intro=intro,
                instruction=instruction,
                actions=[],
                observations=[],
                thoughts=[],
                outputs=[],
                invalid=0,
                task_type=game.task_type,
                gamefile=game.gamefile,
                won=False,
                done=False,
                states=[summarize_facts(gs["facts"])],
            )
        )
    # a bar from the main process, in a terminal and in a log (its ETA: every episode to the cap)
    for _ in tqdm(
        range(args.max_env_steps),
        desc=desc,
        leave=False,
        disable=not PartialState().is_main_process,
    ):
        prompts = {}
        # ETO: an input too long ends the episode, failed
        for i in [i for i, t in enumerate(trajs) if not t["done"]]:
            prompts[i] = tokenizer.apply_chat_template(
                demo_messages(prefix, trajs[i], with_last_obs=True), add_generation_prompt=True
            )["input_ids"]
            trajs[i]["done"] = len(prompts[i]) > args.max_seq_len - args.agent_max_new_tokens
        active = [i for i in prompts if not trajs[i]["done"]]
        if not active:
            break
        batch = tokenizer.pad(
            {"input_ids": [prompts[i] for i in active]}, padding_side="left", return_tensors="pt"
        ).to(model.device)
        out = model.generate(
            **batch,
            max_new_tokens=args.agent_max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            **sample,
        )
        texts = tokenizer.batch_decode(
            out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True
        )
        for i, text in zip(active, texts):
            t = trajs[i]
            game = games[i]
            thought, action = parse_agent_output(text)
            action = action and to_dialect(action, game.legacy_put)  # None: no "Action:"
            t["invalid"] += action not in game.state["admissible_commands"]
            # as ETO: the history keeps the model's own words, and a turn without "Action:" does
            # not step the game (its observation: ETO's format error; its action: "")
            obs = ETO_FORMAT_ERROR
            facts = t["states"][-1]
            if action is not None:  # (done: won or lost; the step limit T is the loop's bound)
                obs, t["won"], t["done"], gs = game.step(action)
                facts = summarize_facts(gs["facts"])
            t["outputs"].append(text)
            t["actions"].append(action or "")
            t["thoughts"].append(thought)
            t["observations"].append(obs)
            t["states"].append(facts)
    for game, t in zip(games, trajs):
        GAME_POOL[game.gamefile].append(game)
        t["thoughts"] = t["thoughts"] if any(t["thoughts"]) else None
    model.train()  # (rollouts happen during training)
    return trajs


def expert_demo(gamefile, max_steps):
    """Play a train game with ALFWorld's hand-coded expert (AlfredExpert, HANDCODED); None when it
    does not win."""
    game = ALFWorldGame(gamefile, expert=True)
    intro, instruction, gs = game.reset()
    actions = []
    observations = []
    for _ in range(max_steps):
        # the 0.4.2 expert says "move X to Y"
        actions.append(to_dialect(gs["extra.expert_plan"][0], game.legacy_put))
        obs, won, done, gs = game.step(actions[-1])
        observations.append(obs)
        if won or done:
            break
    if not won:
        return None
    return dict(
        intro=intro,
        instruction=instruction,
        actions=actions,
        observations=observations,
        thoughts=None,
        z=[1] * len(actions),
        task_type=game.task_type,
        source="expert",
        gamefile=gamefile,
    )


def load_eto_demos(path):
    """ETO's alfworld_sft.json (ShareGPT): a human task turn ("Your task is to: ..."), then
    Action/Observation turns."""
    demos = []
    # every defect of the file is a data error naming it
    with data_error(path, "not ETO format"):
        for i, item in enumerate(json.loads(Path(path).read_text())):
            conv = [(m["from"], m["value"]) for m in item["conversations"]]
            # human and agent take turns (any other order would pair actions with the wrong
            # observations), each turn a string
            roles = [who for who, text in conv if isinstance(text, str)]
            if roles != [("human", "gpt")[k % 2] for k in range(len(conv))]:
                raise SystemExit(
                    f"error: {path}: conversation {i}: turns must alternate human, gpt, human, "
                    f"..., each a string; got {roles[:12]}"
                )
            # the task turn: the human turn right before the first gpt turn with an action
            acts = [
                k
                for k, (who, text) in enumerate(conv)
                if who == "gpt" and re.search(r"action\s*:", text, re.I)
            ]
            if not acts or "Your task is to:" not in conv[acts[0] - 1][1]:
                continue
            intro, _, task = conv[acts[0] - 1][1].partition("Your task is to:")
            turns = [parse_agent_output(text) for _, text in conv[acts[0] :: 2]]
            obs = [
                re.sub(r"^Observation:\s*", "", text.strip()) for _, text in conv[acts[0] + 1 :: 2]
            ]
            obs += [""] * (len(turns) - len(obs))  # a demonstration may end on an action
            thoughts, actions = map(list, zip(*[(th, a or "") for th, a in turns]))
            intro = re.sub(r"^.*?(You are in the middle)", r"\1", intro.strip(), flags=re.S)
            demos.append(
                dict(
                    intro=intro,
                    source="eto",
                    instruction=task.strip().split("\n")[0].rstrip("."),
                    actions=actions,
                    z=[1] * len(turns),
                    observations=obs,
                    thoughts=thoughts if any(thoughts) else None,
                    task_type=item.get("id"),
                )
            )
    if not demos:
        raise SystemExit(
            f"error: {path}: no item has a human 'Your task is to:' turn (not ALFWorld?)"
        )
    return demos


def load_demos(args, games, legacy):
    """D_train: --demos-path (ETO's file, as the paper), else ALFWorld's hand-coded expert on the
    train games."""
    # in the games' command dialect: one dialect per run (ETO's file says "put X in/on Y")
    if args.demos_path:
        demos = load_eto_demos(args.demos_path)[: args.num_demos]
        return [{**d, "actions": [to_dialect(a, legacy) for a in d["actions"]]} for d in demos]
    demos = [
        d
        for g in tqdm(games, desc="expert demos", disable=not PartialState().is_main_process)
        if (d := expert_demo(g, EXPERT_MAX_STEPS))
    ]
    if not demos:
        raise SystemExit(
            "error: no ground-truth demonstrations (the expert won no train game; try --demos-path)"
        )
    return demos


# === Evaluation, logging and checkpoints ==========================================================
def silent(*args, **kwargs):
    """The logger and say() of the processes other than the main one: they report nothing."""


def make_logger(args, run_dir, main_proc):
    """log(metrics, step) to TensorBoard in run_dir (W&B mirrors it with --track); log(None, 0)
    closes the writer."""
    if not main_proc:
        return silent
    from torch.utils.tensorboard import SummaryWriter

    if args.track:  # before the writer, so that W&B patches it
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            sync_tensorboard=True,
            config=vars(args),
            name=run_dir.name,
        )
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "".join(f"|{k}|{v}|\n" for k, v in vars(args).items()),
    )

    def log(metrics, step):
        if not metrics:
            return writer.close()
        for k, v in metrics.items():
            writer.add_scalar(k, v, step)

    return log


def save_checkpoint(path, agent, optimizer, scheduler, state, buffer, accelerator, rng):
    """All a resume needs: weights (adapter with LoRA), optimizer, scheduler, state + D', every
    process's generators (Python, NumPy, torch CPU/CUDA, `rng`: games and D' batches); written to
    {path}.tmp, then renamed (never half)."""
    rngs = gather_object(
        [
            (
                random.getstate(),
                np.random.get_state(),
                torch.get_rng_state(),
                torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                rng.bit_generator.state,
            )
        ]
    )
    if accelerator.is_main_process:
        tmp = path.with_name(path.name + ".tmp")
        agent[0].save_pretrained(tmp)  # the unwrapped model, and its tokenizer
        agent[1].save_pretrained(tmp)
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rngs": rngs,
            },
            tmp / "trainer_state.pt",
        )
        (tmp / "hsl_state.json").write_text(
            json.dumps({**state, "buffer": list(buffer.items)}, default=str)
        )
        shutil.rmtree(path, ignore_errors=True)  # (a resumed run saves "final" again)
        tmp.rename(path)
        tqdm.write(f"[ckpt] saved {path}")


def load_checkpoint(path, optimizer, state, buffer, rng, accelerator, say):
    """Inverse of save_checkpoint (load_agent loads weights); rebuilt: SFT order (seeded), games,
    ETO pair order."""
    # (saved atomically: complete or absent, unless damaged since)
    with data_error(path, "not a complete checkpoint"):
        state.update(json.loads((Path(path) / "hsl_state.json").read_text()))
        buffer.items.extend(state.pop("buffer"))  # (pushed before: weights and all)
        trainer = torch.load(Path(path) / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(trainer["optimizer"])
    py, nps, cpu, cuda, rng.bit_generator.state = trainer["rngs"][accelerator.process_index]
    random.setstate(py)
    np.random.set_state(nps)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    say(
        f"[resume] {path}: sft_steps {state['sft_steps']}, hsl_steps {state['hsl_steps']}, "
        f"D' {len(buffer)}"
    )
    return trainer["scheduler"]


def evaluate(games_by_split, agent, args, accelerator, log, step, tag, state):
    """Greedy success rate on each evaluation split, overall and per task type (Figure 5); each
    process plays its share."""
    t0 = time.time()
    results = {}
    state["evaluations"] += 1
    for split, games in games_by_split.items():
        mine = shard(games, accelerator)
        outcomes = []
        won = collections.defaultdict(list)
        for i in tqdm(
            range(0, len(mine), args.rollouts_per_step),
            f"eval {split}",
            disable=not accelerator.is_main_process,
        ):
            trajs = rollout(mine[i : i + args.rollouts_per_step], agent, args, 0.0, f"eval {split}")
            outcomes += [(t["task_type"], t["won"]) for t in trajs]
        # (once per split: every process joins the gather)
        for task_type, w in unshard(outcomes, accelerator):
            won[TASK_SHORT[task_type]].append(w)
        every = sum(won.values(), [])
        results.update({f"{split}/success": np.mean(every), f"{split}/episodes": len(every)})
        results.update({f"{split}/success_{tt}": np.mean(w) for tt, w in won.items()})
    log({f"eval/{k}": v for k, v in results.items()}, step)
    if accelerator.is_main_process:
        tqdm.write(
            f"[eval {tag}] step {step} ({time.time() - t0:.1f}s): "
            + ", ".join(f"{k} {v:.3f}" for k, v in results.items())
        )
    return results


def hsl_report(progress, times, trajs, buffer, info, counts, counters, args, accelerator):
    """One HSL step's metrics (into `info`) and progress line; times: start, rollout, relabel,
    optimise (Appendix F: 11.5 / 62 / 24 s)."""
    dt = [b - a for a, b in zip(times, times[1:])]
    outcomes = unshard([(t["won"], t["invalid"], len(t["actions"])) for t in trajs], accelerator)
    info.update({f"time/{k}": v for k, v in zip(("rollout", "relabel", "optimise"), dt)})
    info["charts/rollout_success"] = np.mean([o[0] for o in outcomes])
    info["charts/invalid_action_rate"] = sum(o[1] for o in outcomes) / max(
        sum(o[2] for o in outcomes), 1
    )
    info.update({"buffer/size": len(buffer), **{f"relabel/{k}": v for k, v in counts.items()}})
    for tt in TASK_TYPES:  # what D' holds (Figure 5, top)
        info[f"buffer/frac_{TASK_SHORT[tt]}"] = sum(
            d["task_type"] == tt for d in buffer.items
        ) / max(len(buffer), 1)
    terms = "D' empty: SFT only"
    if "hsl/loss" in info:
        terms = f"L_D' {info['hsl/loss']:.4f}, L_SFT {info['sft/loss']:.4f}"
    line = (
        f"[hsl] step {progress} | rollout {dt[0]:.1f}s relabel {dt[1]:.1f}s "
        f"optimise {dt[2]:.1f}s | success {info['charts/rollout_success']:.2f} | "
        f"relabeled +{counts['pushed']} buffer {len(buffer)} | "
        f"loss {info['losses/hsl_total']:.4f} ({terms})"
    )
    if args.relabeler == "llm":
        sp, sr = precision_recall(counts)
        p, r = precision_recall(counters)
        info.update({"relabel/precision_vs_oracle": sp, "relabel/recall_vs_oracle": sr})
        line += (
            f" | precision {sp:.2f} recall {sr:.2f} (cum {p:.2f}/{r:.2f})"
            " (skips: relabel/ in TensorBoard)"
        )
    return line


def check_replicas(agent, buffer, accelerator, say):
    """Data parallelism must leave every process with the same model and the same D'."""
    if accelerator.num_processes > 1:
        weights = float(sum(p.detach().double().sum() for p in agent[0].parameters()))
        held = json.dumps(list(buffer.items), sort_keys=True, default=str)
        same = len(set(gather_object([(weights, held)]))) == 1
        say(
            f"[accelerate] {accelerator.num_processes} processes; "
            f"model and D' identical on all: {same}"
        )


def write_summary(run_dir, state, final, buffer, num_demos, args, accelerator):
    """summary.json: the run state, the final evaluation, precision / recall against the oracle
    (LLM relabeler) and the arguments."""
    if accelerator.is_main_process:
        counters = state["counters"]
        p, r = precision_recall(counters) if args.relabeler == "llm" else (None, None)
        summary = {
            **state,
            "relabeled_pushed": counters["pushed"],
            "buffer_size": len(buffer),
            "num_demos": num_demos,
            "final_eval": final,
            "precision_vs_oracle": p,
            "recall_vs_oracle": r,
            "args": asdict(args),
        }
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))


# === LLM client (identical in all five scripts) ===================================================
class LLMClient:
    """`chat(conversations) -> [answer or None]` over an OpenAI-compatible endpoint (key from
    $OPENAI_API_KEY) or an in-process transformers model. A request that fails after its retries
    gives None, counted in `self.failures`: it never stops training. Answers are untrusted text, cut
    to a bounded size; callers validate them, nothing is run."""

    def __init__(self, args):
        self.args = args
        self.failures = 0
        greedy = args.llm_temperature == 0
        if args.llm_backend == "openai":
            from openai import OpenAI

            key = os.environ.get("OPENAI_API_KEY", "EMPTY")  # local servers check no key
            self.client = OpenAI(
                base_url=args.llm_base_url, api_key=key, timeout=args.llm_timeout, max_retries=2
            )
            self.kw = dict(
                temperature=args.llm_temperature, max_tokens=args.llm_max_new_tokens, seed=args.seed
            )
            try:  # fail at start with one line, not after the first training phase
                self.client.with_options(timeout=min(args.llm_timeout, 30.0)).models.list()
            except Exception as e:
                raise SystemExit(
                    f"error: --llm-base-url {args.llm_base_url}: no OpenAI-compatible server "
                    f"answers ({type(e).__name__}); start one (e.g. `vllm serve MODEL`) or use "
                    "--llm-backend transformers"
                )
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(args.llm_model, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(args.llm_model, dtype="auto")
        except (OSError, ValueError) as e:
            raise SystemExit(
                f"error: --llm-model {args.llm_model}: cannot load it with transformers ({e})"
            )
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.kw = dict(
            max_new_tokens=args.llm_max_new_tokens,
            do_sample=not greedy,
            pad_token_id=self.tok.pad_token_id,
            top_p=None,  # the model's own generation defaults would otherwise apply
            top_k=None,
        )
        if not greedy:
            self.kw["temperature"] = args.llm_temperature

    def ask(self, messages):
        try:
            r = self.client.chat.completions.create(
                model=self.args.llm_model, messages=messages, **self.kw
            )
            return r.choices[0].message.content or ""
        except Exception as e:  # timeouts, HTTP 5xx after retries, cut connections: a counted skip
            print(f"[llm] request failed: {type(e).__name__}: {str(e)[:200]}")
            return None

    def chat(self, conversations: list) -> list:
        n = self.args.llm_concurrency
        # a line per batch of requests: a slow model or server is never a silent wait
        print(f"[llm] {len(conversations)} request(s), {n} at a time: {self.args.llm_model}")
        if self.args.llm_backend == "openai":
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                outs = list(pool.map(self.ask, conversations))
        else:  # in process, --llm-concurrency is the generation batch size
            outs = []
            for i in range(0, len(conversations), n):
                enc = self.tok.apply_chat_template(
                    conversations[i : i + n],
                    add_generation_prompt=True,
                    padding=True,
                    return_tensors="pt",
                    return_dict=True,
                ).to(self.model.device)
                gen = self.model.generate(**enc, **self.kw)  # no gradients (generate's own no_grad)
                new_tokens = gen[:, enc["input_ids"].shape[1] :]
                outs += self.tok.batch_decode(new_tokens, skip_special_tokens=True)
        self.failures += sum(o is None for o in outs)
        # bounded size even when a server ignores max_tokens
        # (about 4 characters a token, wide margin)
        return [o if o is None else o[: 16 * self.args.llm_max_new_tokens] for o in outs]


# === Main =========================================================================================
# The phases below are shared, byte for byte, with hsl_dpo.py; main() wires them together.
def load_inputs(args):
    """Prompts, games, the agent's prompt prefix, D_train and the relabeler, loaded before the
    agent so that a bad input fails at once."""
    # Figures 8-9 and our user turns
    prompts = {
        n: read_prompt(f"alfworld_{n}.md")
        for n in (
            "goal_inference",
            "goal_inference_user",
            "action_relevance",
            "action_relevance_user",
        )
    }
    train_games = list_games(args.data_dir, "train")
    eval_games = {s: list_games(args.data_dir, s) for s in ("valid_seen", "valid_unseen")}
    legacy = ALFWorldGame(train_games[0]).legacy_put  # one command dialect per run: the games'
    prefix = agent_prefix(args, legacy)  # ETO's instruction and in-context example
    demos = load_demos(args, train_games[: args.num_demos], legacy)
    # an unreachable endpoint fails now, not after SFT
    client = LLMClient(args) if args.relabeler == "llm" else None
    return prompts, train_games, eval_games, prefix, demos, client


def load_learner(args, prefix, demos, state, rng, accelerator, say):
    """The agent (prepared by accelerate; `agent` = its unwrapped model, tokenizer, prefix), its
    AdamW optimiser, D_train encoded for it and its batch order, D', and with --resume the
    checkpoint's state (and its scheduler's, returned for the phase it belongs to)."""
    tokenizer, model = load_agent(args)
    check_memory(args, model)  # before the GPU holds anything
    encoded = [
        encode_demo(tokenizer, demo_messages(prefix, d), d["z"], args.max_seq_len) for d in demos
    ]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, weight_decay=WEIGHT_DECAY)
    model, optimizer = accelerator.prepare(model.train(), optimizer)
    agent = (accelerator.unwrap_model(model), tokenizer, prefix)
    buffer = HindsightBuffer(
        args.buffer_size, args.hsl_alpha, uniform=args.ablation == "uniform_weight"
    )
    saved_sched = (
        load_checkpoint(args.resume, optimizer, state, buffer, rng, accelerator, say)
        if args.resume
        else None
    )
    # over the run (tp/fp/fn: LLM vs oracle)
    state["counters"] = collections.Counter(state["counters"])
    # SFT, then the L_SFT term of Eq. 4; a resumed run goes on where it stopped
    batches = itertools.islice(
        demo_batches(len(encoded), args.batch_size, args.seed),
        state["sft_steps"] + state["hsl_steps"],
        None,
    )
    return model, optimizer, agent, encoded, buffer, batches, saved_sched


def sft_phase(
    model, optimizer, agent, encoded, batches, saved_sched, state, args, accelerator, log, say, save
):
    """Phase 1 (Appendix F): SFT on the ground-truth demonstrations D_train; checkpoints
    "sft_{step}" every SFT_CHECKPOINT_EVERY steps, "sft" at the end."""
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    num_steps = round(args.sft_epochs * steps_per_epoch)
    sched = make_scheduler(optimizer, num_steps, saved_sched if state["hsl_steps"] == 0 else None)
    t0 = time.time()
    first = state["sft_steps"]
    say(f"[plan] SFT: {num_steps - first} steps of {args.batch_size} of {len(encoded)} demos")
    for step in tqdm(
        range(first, num_steps),
        desc="sft",
        disable=not accelerator.is_main_process,
    ):
        batch = [encoded[i] for i in next(batches)]
        info = accumulate_loss(model, batch, 1.0, args, accelerator, "sft", agent[1].pad_token_id)
        info.update(optimizer_step(model, optimizer, sched, accelerator, info["sft/loss"]))
        state["sft_steps"] = step + 1
        log(info, step + 1)
        if step == 0 or (step + 1) % steps_per_epoch == 0 or step + 1 == num_steps:
            speed = f"{(step + 1 - first) / (time.time() - t0):.2f} steps/s"
            say(f"[sft] step {step + 1}/{num_steps} loss {info['sft/loss']:.4f} ({speed})")
        if (step + 1) % SFT_CHECKPOINT_EVERY == 0 and step + 1 < num_steps:
            save(f"sft_{step + 1}", optimizer, sched)
    if first < num_steps:
        save("sft", optimizer, sched)


def hsl_phase(
    model,
    optimizer,
    agent,
    encoded,
    batches,
    saved_sched,
    buffer,
    games,
    eval_games,
    client,
    prompts,
    rng,
    state,
    args,
    accelerator,
    log,
    say,
    save,
):
    """Phase 2, the HSL loop (Section 3.2): rollout -> relabel -> push to D' -> one HSL update;
    evaluation and checkpoint every --eval-every steps. Returns the scheduler."""
    num_steps = (  # -1: HSL_EPOCHS passes over D_train
        args.hsl_steps
        if args.hsl_steps >= 0
        else round(HSL_EPOCHS * math.ceil(len(encoded) / args.batch_size))
    )
    sched = make_scheduler(optimizer, num_steps, saved_sched if state["hsl_steps"] > 0 else None)
    t_hsl = time.time()
    first = state["hsl_steps"]
    b = args.rollouts_per_step
    say(
        f"[plan] HSL: {num_steps - first} steps, each {b} rollouts of at most {args.max_env_steps} "
        f"actions, then one update; evaluation every {args.eval_every} steps (0: none) and at "
        "the end"
    )
    for step in tqdm(
        range(first, num_steps),
        desc="hsl",
        disable=not accelerator.is_main_process,
    ):
        # 1) trajectory collection: b train instructions, a_t ~ pi_theta; each process its share
        times = [time.time()]
        picked = [games[i] for i in rng.choice(len(games), b, replace=len(games) < b)]
        trajs = rollout(shard(picked, accelerator), agent, args, args.rollout_temperature)
        times.append(time.time())
        # 2) relabel with the goals actually achieved (Section 3.3); counts summed over processes
        counts = collections.Counter()
        relabeled = unshard(relabel(trajs, args, counts, client, prompts), accelerator)
        counts = sum(unshard([counts], accelerator), collections.Counter())
        # 3) push to D': every process pushes all processes' demonstrations, in the global order
        buffer.push_all(relabeled, counts)
        state["counters"].update(counts)
        times.append(time.time())
        # 4) one optimisation step on L_HSL = lambda L_D' + (1 - lambda) L_SFT (Eq. 4)
        sft_batch = [encoded[i] for i in next(batches)]
        info = hsl_update(model, optimizer, sched, buffer, sft_batch, agent, args, accelerator, rng)
        state["hsl_steps"] = step + 1
        times.append(time.time())
        # 5) log, evaluate, checkpoint
        say(
            hsl_report(
                f"{step + 1}/{num_steps}",
                times,
                trajs,
                buffer,
                info,
                counts,
                state["counters"],
                args,
                accelerator,
            )
        )
        speed = (step + 1 - first) / (time.time() - t_hsl)
        log({**info, "charts/steps_per_second": speed}, step + 1)
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 < num_steps:
            evaluate(eval_games, agent, args, accelerator, log, step + 1, "hsl", state)
            save(f"hsl_{step + 1}", optimizer, sched)
    return sched


def main():
    args = tyro.cli(Args)
    check_args(args)

    accelerator = Accelerator()
    run_dir = (  # one run name on every process: the main process's
        Path(args.run_dir) / gather_object([f"{args.exp_name}__{args.seed}__{int(time.time())}"])[0]
    )
    set_seed(args.seed)  # Python, NumPy, torch; the environments are deterministic
    rng = np.random.default_rng(args.seed + 10_000)  # every process's: games picked, D' batches
    say = tqdm.write if accelerator.is_main_process else silent  # from the main process only

    # inputs first (they fail early), then the agent, D' and the run state (or a checkpoint's)
    prompts, train_games, eval_games, prefix, demos, client = load_inputs(args)
    state = {"sft_steps": 0, "hsl_steps": 0, "evaluations": 0, "counters": {}}
    model, optimizer, agent, encoded, buffer, batches, saved_sched = load_learner(
        args, prefix, demos, state, rng, accelerator, say
    )
    log = make_logger(args, run_dir, accelerator.is_main_process)  # the run folder, only now

    def save(name, optimizer, sched):
        save_checkpoint(
            run_dir / "checkpoints" / name, agent, optimizer, sched, state, buffer, accelerator, rng
        )

    # what every phase reads and writes: the run state, the arguments, the processes, the outputs
    run = dict(state=state, args=args, accelerator=accelerator, log=log, say=say, save=save)
    sft_phase(model, optimizer, agent, encoded, batches, saved_sched, **run)
    if args.eval_every > 0 and state["hsl_steps"] == 0:
        evaluate(eval_games, agent, args, accelerator, log, 0, "after sft", state)
    sched = hsl_phase(
        model,
        optimizer,
        agent,
        encoded,
        batches,
        saved_sched,
        buffer,
        train_games,
        eval_games,
        client,
        prompts,
        rng,
        **run,
    )

    # final evaluation, checkpoint and summary
    final = evaluate(eval_games, agent, args, accelerator, log, state["hsl_steps"], "final", state)
    check_replicas(agent, buffer, accelerator, say)
    save("final", optimizer, sched)
    write_summary(run_dir, state, final, buffer, len(demos), args, accelerator)
    log(None, 0)  # closes the writer
    accelerator.wait_for_everyone()  # every process leaves together, then the group is torn down
    accelerator.end_training()


if __name__ == "__main__":
    main()
