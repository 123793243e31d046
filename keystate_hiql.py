"""LLM-Driven Relabeling (key-state-prioritised goal relabeling) on top of HIQL, on OGBench.

Paper: Gao, Sun, Wang, Zheng, "Better Goals, Better Policies: LLM-Driven Relabeling for Offline Goal-Conditioned
Reinforcement Learning", AAMAS 2026 extended abstract (no arXiv version). The four components of its Figure 1
(Section 2.1) are named functions below:
  (1) semantic key-state rule generation   -> `generate_rules` (prompts/keystate/rule_generation.md)
  (2) rule compilation into discriminators -> `compile_condition` (whitelisted AST -> vectorised NumPy; LLM output is
      never executed)
  (3) key-state-prioritised relabeling     -> `keystate_goals` / `sample_goals` (inside the jitted update)
  (4) offline GCRL, only relabeling changed -> HIQL (Park et al., arXiv 2307.11949) as OGBench's reference agent
      (impls/agents/hiql.py); keystate_gciql.py is the same file with GCIQL
plus the two self-checks: compile time (`check_rules`: parse, run, fire rate; failures go back in a repair prompt) and
relabel time (`RelabelCheck`: TD error of key-state vs HER goals adapts p_keystate). Notes: docs/keystate_hiql.md.

    vllm serve Qwen/Qwen2.5-7B-Instruct   # any OpenAI-compatible endpoint writes the rules
    python keystate_hiql.py --env-name antmaze-large-navigate-v0 --llm-model Qwen/Qwen2.5-7B-Instruct
    python keystate_hiql.py --relabel her --dataset-fraction 0.5           # HER baseline, reduced-data setting
    python keystate_hiql.py --rules-path runs/<run>/rules.json --seed 1    # reuse one LLM call across seeds
"""

# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "numpy==2.4.6",
#     "jax[cpu]==0.10.2",
#     "jaxlib==0.10.2",
#     "flax==0.12.8",
#     "optax==0.2.8",
#     "tyro==1.0.17",
#     "tqdm==4.70.1",
#     "ogbench==1.2.2",
#     "torch==2.13.0",
#     "tensorboard==2.21.0",
#     "openai==3.54.0",
#     "transformers==5.19.0",
# ]
# ///
# (wandb, only with --track: `pip install wandb`)

import ast
import concurrent.futures
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Callable, Dict, List, Literal, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from tqdm import tqdm

PROMPTS = Path(__file__).resolve().parent / "prompts"


# ======================================================================================================================
# Args
# ======================================================================================================================
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 0
    """seed of the experiment (Python, NumPy, JAX, evaluation episodes, LLM requests)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "llm-relabeling"
    """the wandb's project name"""
    wandb_entity: Optional[str] = None
    """the entity (team) of wandb's project"""
    run_dir: str = "runs"
    """parent folder of each run's {run_dir}/{run_name}/ (TensorBoard, rules.json, TD errors, params)"""

    # --- environment & dataset -----------------------------------------------------------------------------------------
    env_name: str = "antmaze-large-navigate-v0"
    """OGBench dataset name (environment + dataset type), e.g. antmaze-large-navigate-v0, cube-single-play-v0"""
    dataset_path: Optional[str] = None
    """local .npz in OGBench's layout (observations, actions, terminals); default: ogbench downloads the official one"""
    dataset_fraction: float = 1.0
    """fraction of episodes kept (paper's reduced-data setting: 0.5); the same subset for every seed and arm"""

    # --- training loop --------------------------------------------------------------------------------------------------
    total_steps: int = 500_000
    """number of gradient steps (paper: 500,000)"""
    batch_size: int = 1024
    """batch size (OGBench: 1024)"""
    log_interval: int = 5_000
    """log losses / steps-per-second every this many steps"""
    eval_interval: int = 100_000
    """evaluate every this many steps (and at the end); 0 evaluates only at the end"""
    eval_episodes: int = 50
    """evaluation episodes per task (paper / OGBench protocol: 50)"""
    eval_tasks: Optional[int] = None
    """evaluate only the first N of the environment's 5 tasks (default: all)"""

    # --- goal relabeling (the method) ----------------------------------------------------------------------------------
    relabel: Literal["her", "keystate"] = "keystate"
    """goal relabeling: OGBench's standard mixture (her) or key-state-prioritised (keystate, the paper's method)"""
    discount: Optional[float] = None
    """discount factor; also the geometric future-goal parameter (default: OGBench's per-env value, 0.99 or 0.995)"""
    rules_path: Optional[str] = None
    """JSON rule set (as saved in runs/{run_name}/rules.json); skips the LLM call"""
    layout_path: Optional[str] = None
    """observation-layout description for --env-name (default: prompts/keystate/layout_<family>.md)"""
    num_rules: int = 3
    """number of rules asked from the LLM (the paper publishes none of these key-state values; ours)"""
    max_repair_rounds: int = 2
    """compile-time self-check: rounds of the repair prompt for rules that failed"""
    p_keystate: float = 0.5
    """probability that a future-state goal is replaced by a key state within the window (initial value when adapted)"""
    keystate_window: int = 200
    """temporal window: key-state goals lie in (t, t + window] of the same trajectory"""
    keystate_actor_goals: bool = True
    """also apply key-state relabeling to the actor's future-state goals (not only the value goals)"""
    adapt_interval: int = 1_000
    """relabel-time self-check: steps between p_keystate adaptations from the TD errors (0: p_keystate stays fixed)"""

    # --- LLM client (the same seven flags in every script) ------------------------------------------------------------
    llm_backend: Literal["openai", "transformers"] = "openai"
    """openai: any OpenAI-compatible endpoint (`vllm serve`, SGLang, llama.cpp, `transformers serve`, hosted; key from
    $OPENAI_API_KEY); transformers: the model in this process (offline runs with small local models)"""
    llm_model: str = "Qwen/Qwen2.5-7B-Instruct"
    """model name sent to the endpoint, or (transformers) a hub id or local folder"""
    llm_base_url: str = "http://localhost:8000/v1"
    """base URL of the OpenAI-compatible endpoint"""
    llm_timeout: float = 120.0
    """seconds per request (openai; two retries on timeouts and server errors)"""
    llm_max_new_tokens: int = 512
    """maximum new tokens per answer"""
    llm_temperature: float = 0.0
    """sampling temperature (0: greedy)"""
    llm_concurrency: int = 8
    """requests in flight (openai), or the generation batch size (transformers)"""

    # --- HIQL agent (OGBench impls/agents/hiql.py defaults) ------------------------------------------------------------
    lr: float = 3e-4
    """Adam learning rate"""
    hidden_dims: Tuple[int, ...] = (512, 512, 512)
    """hidden sizes of the value, subgoal-representation and both actor MLPs"""
    expectile: float = 0.7
    """expectile of the action-free value loss (HIQL: 0.7)"""
    high_alpha: Optional[float] = None
    """AWR temperature of the high-level actor (default: OGBench's per-env value, 3.0; antmaze-explore 10.0)"""
    low_alpha: Optional[float] = None
    """AWR temperature of the low-level actor (default: OGBench's per-env value, 3.0; antmaze-explore 10.0)"""
    subgoal_steps: Optional[int] = None
    """k: the subgoal is the state k steps ahead (default: OGBench's per-env value, 25; cube/scene/puzzle 10)"""
    keystate_subgoals: bool = False
    """EXTENSION, not tested in the paper: w.p. p_keystate the subgoal s_{t+k} becomes the last key state in (t, t+k]"""


# Fixed values nobody tunes in the paper's experiments (each with the reason for its value).
TAU = 0.005  # soft target update rate, as OGBench
DATASET_SUBSET_SEED = 0  # apart from --seed: both arms and all seeds of the reduced-data setting see the same episodes
VALUE_P_CURGOAL, VALUE_P_TRAJGOAL, VALUE_P_RANDOMGOAL = 0.2, 0.5, 0.3  # value-goal mixture of OGBench's GCDataset
MAX_LAG = 20  # largest k in prev/next/delta: 20 steps span a turn or a grasp at OGBench's control rates
# A rule that fires on (almost) no state or on a large share of all states does not pick out *key* states.
RULE_MIN_FIRE, RULE_MAX_FIRE = 0.001, 0.3
# Relabel-time self-check: p_keystate moves by this step per adaptation and stays inside the bounds, so that neither
# HER goals (lower bound) nor key-state goals (upper bound) vanish from the batches.
ADAPT_STEP, P_KEYSTATE_MIN, P_KEYSTATE_MAX = 0.05, 0.05, 0.9
TD_HIST_INTERVAL = 10_000  # steps between TD-error histograms (Figure 2 of the paper), and at the last step


def check_args(args: Args):
    """Usage errors as one line (`error: --flag: ...`) before anything heavy; the rule compiler keeps its own checks."""
    checks = [  # (field, valid?, what it must be)
        *[(n, getattr(args, n) >= 1, ">= 1") for n in ("total_steps", "batch_size", "log_interval", "eval_episodes")],
        *[(n, getattr(args, n) >= 1, ">= 1") for n in ("num_rules", "keystate_window", "llm_concurrency")],
        *[(n, getattr(args, n) >= 0, ">= 0") for n in ("eval_interval", "max_repair_rounds", "adapt_interval")],
        ("eval_tasks", args.eval_tasks is None or args.eval_tasks >= 1, ">= 1"),
        ("dataset_fraction", 0.0 < args.dataset_fraction <= 1.0, "in (0, 1]"),
        ("p_keystate", 0.0 <= args.p_keystate <= 1.0, "in [0, 1]"),
        ("discount", args.discount is None or 0.0 < args.discount < 1.0, "in (0, 1)"),
        ("hidden_dims", len(args.hidden_dims) > 0 and min(args.hidden_dims) >= 1, "one or more sizes >= 1"),
        ("llm_temperature", args.llm_temperature >= 0, ">= 0"),
    ]
    for name, ok, what in checks:
        if not ok:
            raise SystemExit(f"error: --{name.replace('_', '-')}: must be {what}, got {getattr(args, name)}")
    for name in ("dataset_path", "rules_path", "layout_path"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_file():
            raise SystemExit(f"error: --{name.replace('_', '-')}: file {getattr(args, name)} does not exist")


# OGBench's per-environment HIQL settings (impls/hyperparameters.sh); keys are matched in order on the env name.
OGBENCH_HIQL_PRESETS = [  # (substring, subgoal_steps, discount)
    ("pointmaze-giant", 25, 0.995),
    ("antmaze-giant", 25, 0.995),
    ("humanoidmaze", 100, 0.995),
    ("cube", 10, 0.99),
    ("scene", 10, 0.99),
    ("puzzle", 10, 0.99),
]
REP_DIM = 10  # size of the subgoal representation phi([s; g]), as OGBench
LOW_ACTOR_REP_GRAD = False  # OGBench lets the low-level actor train phi only for pixel observations


def resolve_presets(args: Args) -> Args:
    """Fill the per-env defaults (alphas, subgoal steps, discount) as OGBench's hyperparameters.sh."""
    subgoal_steps, discount = 25, 0.99  # OGBench get_config() defaults
    for key, k, d in OGBENCH_HIQL_PRESETS:
        if key in args.env_name:
            subgoal_steps, discount = k, d
            break
    alpha = 10.0 if "antmaze" in args.env_name and "explore" in args.env_name else 3.0
    args.high_alpha = alpha if args.high_alpha is None else args.high_alpha
    args.low_alpha = alpha if args.low_alpha is None else args.low_alpha
    args.subgoal_steps = subgoal_steps if args.subgoal_steps is None else args.subgoal_steps
    args.discount = discount if args.discount is None else args.discount
    if args.subgoal_steps < 1:  # validated here, where the per-env value is known
        raise SystemExit(f"error: --subgoal-steps: must be >= 1, got {args.subgoal_steps}")
    return args


def actor_p_randomgoal(env_name: str) -> float:
    """OGBench's actor-goal mixture (hyperparameters.sh): stitch datasets half random goals, explore all random, else
    uniform-future goals of the same trajectory."""
    return 1.0 if "explore" in env_name else 0.5 if "stitch" in env_name else 0.0


# ======================================================================================================================
# Environment & dataset
# ======================================================================================================================
class Dataset(NamedTuple):
    """OGBench's compact layout (compact_dataset=True): next state of row i is row i+1 where valids[i] = 1."""

    observations: np.ndarray  # (N, ob_dim) float32
    actions: np.ndarray  # (N, act_dim) float32
    terminals: np.ndarray  # (N,) 1 on the last *valid* row of each episode and on the row after it (OGBench)
    valids: np.ndarray  # (N,) 0 on each episode's final row (it has no next state)


def make_env(env_name: str):
    """Make the OGBench evaluation environment; a clear error for unknown names (never a deep traceback)."""
    import ogbench

    try:
        return ogbench.make_env_and_datasets(env_name, env_only=True)
    except Exception as e:  # gymnasium raises several error types for unknown / malformed names
        raise SystemExit(f"error: unknown OGBench environment {env_name!r} ({type(e).__name__}: {e})") from None


def load_dataset(args: Args, ob_dim: int, act_dim: int) -> Dataset:
    """--dataset-path, or the official dataset (ogbench downloads it to ~/.ogbench/data on first use); then the
    reduced-data subset."""
    if args.dataset_path is not None:
        ds = load_ogbench_npz(args.dataset_path, ob_dim, act_dim)
    else:
        import ogbench

        try:
            _, train, _ = ogbench.make_env_and_datasets(args.env_name, compact_dataset=True)
        except Exception as e:
            raise SystemExit(
                f"error: could not download or read the OGBench dataset {args.env_name!r} ({type(e).__name__}: {e}); "
                "pass --dataset-path for a local .npz"
            ) from None
        ds = Dataset(train["observations"], train["actions"], train["terminals"], train["valids"])
    return subset_episodes(ds, args.dataset_fraction, DATASET_SUBSET_SEED)


def load_ogbench_npz(path: str, ob_dim: int, act_dim: int) -> Dataset:
    """Load and validate a local .npz in OGBench's layout, then convert it like ogbench.load_dataset(compact=True)."""
    try:
        file = np.load(path)
    except Exception as e:
        raise SystemExit(f"error: cannot read {path} as .npz ({e})") from None
    missing = [k for k in ("observations", "actions", "terminals") if k not in file.files]
    if missing:
        raise SystemExit(f"error: {path} lacks keys {missing} (has {file.files}); expected OGBench's layout")
    obs, act, term = file["observations"], file["actions"], file["terminals"]
    n = len(obs)
    if obs.ndim != 2 or obs.shape[1] != ob_dim:
        raise SystemExit(f"error: {path}: observations have shape {obs.shape}, expected (N, {ob_dim}) for this env")
    if act.shape != (n, act_dim) or term.shape != (n,):
        raise SystemExit(
            f"error: {path}: actions / terminals have shape {act.shape} / {term.shape}, expected "
            f"({n}, {act_dim}) / ({n},)"
        )
    if n < 2 or not term[-1]:
        raise SystemExit(f"error: {path}: terminals must mark the last row of every episode (last row is {term[-1]})")
    if not (np.isfinite(obs).all() and np.isfinite(act).all()):
        raise SystemExit(f"error: {path}: observations/actions contain NaN or inf")
    return to_compact(obs.astype(np.float32), act.astype(np.float32), term.astype(np.float32))


def to_compact(obs, act, term) -> Dataset:
    """Same transformation as ogbench.utils.load_dataset(compact_dataset=True)."""
    valids = 1.0 - term
    new_terminals = np.concatenate([term[1:], [1.0]])
    terminals = np.minimum(term + new_terminals, 1.0).astype(np.float32)
    return Dataset(obs, act, terminals, valids.astype(np.float32))


def subset_episodes(ds: Dataset, fraction: float, seed: int) -> Dataset:
    """Reduced-data setting (paper Section 3): keep a deterministic random subset of whole episodes."""
    if fraction >= 1.0:
        return ds
    ends = np.nonzero(ds.valids == 0)[0]  # the final row of every episode
    starts = np.concatenate([[0], ends[:-1] + 1])
    n_keep = max(1, int(round(fraction * len(ends))))
    keep = np.sort(np.random.default_rng(seed).permutation(len(ends))[:n_keep])
    rows = np.concatenate([np.arange(starts[e], ends[e] + 1) for e in keep])
    return Dataset(*(a[rows] for a in ds))


def episode_index(ds: Dataset):
    """Per row: first and last row of its episode (the last row has no next state and is never a goal)."""
    ends = np.nonzero(ds.valids == 0)[0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    ep_id = np.searchsorted(ends, np.arange(len(ds.valids)), side="left")
    return starts[ep_id], ends[ep_id]


# ======================================================================================================================
# LLM client: the same class, flags and errors in all five scripts
# ======================================================================================================================
class LLMClient:
    """`chat(conversations) -> [answer or None]` over an OpenAI-compatible endpoint (`vllm serve`, SGLang, llama.cpp,
    `transformers serve`, hosted APIs; key from $OPENAI_API_KEY) or an in-process transformers model (offline runs).

    A request that still fails after its retries gives None and is counted in `self.failures`: one bad answer never
    stops training. Answers are untrusted text, cut to a bounded size here; callers parse and validate them, and
    nothing an LLM writes is ever executed.
    """

    def __init__(self, args):
        self.args, self.failures, greedy = args, 0, args.llm_temperature == 0
        if args.llm_backend == "openai":
            from openai import OpenAI

            key = os.environ.get("OPENAI_API_KEY", "EMPTY")  # local servers check no key, the client wants one
            self.client = OpenAI(base_url=args.llm_base_url, api_key=key, timeout=args.llm_timeout, max_retries=2)
            self.kw = dict(temperature=args.llm_temperature, max_tokens=args.llm_max_new_tokens, seed=args.seed)
            try:  # fail at start with one line, not after the first training phase
                self.client.with_options(timeout=min(args.llm_timeout, 30.0)).models.list()
            except Exception as e:
                raise SystemExit(
                    f"error: --llm-base-url {args.llm_base_url}: no OpenAI-compatible server answers ({type(e).__name__}); "
                    "start one (e.g. `vllm serve MODEL`) or use --llm-backend transformers"
                ) from None
            return
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(args.llm_model, padding_side="left")
            self.model = AutoModelForCausalLM.from_pretrained(args.llm_model, dtype="auto")
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --llm-model {args.llm_model}: cannot load it with transformers ({e})") from None
        self.model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
        self.tok.pad_token = self.tok.pad_token or self.tok.eos_token
        self.kw = dict(max_new_tokens=args.llm_max_new_tokens, do_sample=not greedy, pad_token_id=self.tok.pad_token_id)
        self.kw.update(dict(top_p=None, top_k=None) | ({} if greedy else dict(temperature=args.llm_temperature)))

    def ask(self, messages):
        try:
            r = self.client.chat.completions.create(model=self.args.llm_model, messages=messages, **self.kw)
            return r.choices[0].message.content or ""
        except Exception as e:  # timeouts, HTTP 5xx after retries, cut connections: a counted skip
            print(f"[llm] request failed: {type(e).__name__}: {str(e)[:200]}")
            return None

    def chat(self, conversations: list) -> list:
        n = self.args.llm_concurrency
        if self.args.llm_backend == "openai":
            with concurrent.futures.ThreadPoolExecutor(n) as pool:
                outs = list(pool.map(self.ask, conversations))
        else:  # in process, --llm-concurrency is the generation batch size
            import torch

            outs = []
            for i in range(0, len(conversations), n):
                enc = self.tok.apply_chat_template(
                    conversations[i : i + n],
                    add_generation_prompt=True,
                    padding=True,
                    return_tensors="pt",
                    return_dict=True,
                ).to(self.model.device)
                with torch.no_grad():
                    gen = self.model.generate(**enc, **self.kw)
                outs += self.tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        self.failures += sum(o is None for o in outs)
        # bounded size even when a server ignores max_tokens (about 4 characters a token, with a wide margin)
        return [o if o is None else o[: 16 * self.args.llm_max_new_tokens] for o in outs]


# ======================================================================================================================
# Key-state rules: generation (1), safe compilation into discriminators (2), compile-time self-check
# ======================================================================================================================
# The only functions a rule may call, with their arity (norm: 1 to 8 arguments). prev/next/delta take (expression,
# integer lag) and read the state k steps earlier/later, clamped to the same episode.
FUNCS = {
    "abs": (np.abs, 1),
    "sqrt": (lambda x: np.sqrt(np.abs(x)), 1),
    "exp": (lambda x: np.exp(np.clip(x, -50, 50)), 1),
    "log": (lambda x: np.log(np.abs(x) + 1e-8), 1),
    "sin": (np.sin, 1),
    "cos": (np.cos, 1),
    "tanh": (np.tanh, 1),
    "sign": (np.sign, 1),
    "arctan2": (np.arctan2, 2),
    "min": (np.minimum, 2),
    "max": (np.maximum, 2),
    "clip": (np.clip, 3),
    "norm": (lambda *a: np.sqrt(sum(np.square(x) for x in a)), None),
    "prev": (None, 2),
    "next": (None, 2),
    "delta": (None, 2),
}
BINOPS = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.Div: lambda a, b: a / np.where(b == 0, 1e-8, b),
}
CMPOPS = {
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
}
MAX_EXPR_CHARS, MAX_AST_NODES, MAX_POW = 400, 120, 4  # bounds on what a rule may cost to parse and evaluate


class RuleError(ValueError):
    """A rule that fails to parse, to validate or to run; the message goes back to the LLM in the repair prompt."""


def parse_layout(text: str) -> Tuple[str, Dict[str, int]]:
    """Read a layout prompt file: body after '---' and the feature map from lines "- `name` = sINDEX: meaning"."""
    if "\n---\n" not in text:
        raise SystemExit("error: layout file has no '---' line separating header and body")
    body = text.split("\n---\n", 1)[1].strip()
    return body, {m.group(1): int(m.group(2)) for m in re.finditer(r"^- `(\w+)` = s(\d+)", body, re.M)}


class Features:
    """The named state features a rule may use: s0 ... s{d-1}, the layout's names for them, and t / t_left (the
    position inside the episode)."""

    def __init__(self, obs, ep_start, ep_end, names: Dict[str, int], max_lag: int = MAX_LAG):
        self.obs, self.ep_start, self.ep_end, self.max_lag = obs, ep_start, ep_end, max_lag
        self.n, self.idx = len(obs), np.arange(len(obs))
        self.columns = {f"s{i}": i for i in range(obs.shape[1])}
        for name, i in names.items():
            if i >= obs.shape[1]:
                raise SystemExit(f"error: layout feature {name} = s{i} but observations have {obs.shape[1]} dims")
            self.columns[name] = i
        self.extra = {"t": (self.idx - ep_start).astype(np.float32), "t_left": (ep_end - self.idx).astype(np.float32)}
        self.names = list(self.columns) + list(self.extra)

    def value(self, name: str, rows) -> np.ndarray:
        v = self.obs[:, self.columns[name]] if name in self.columns else self.extra[name]
        return v if rows is None else v[rows]


def number(node) -> float:
    """The value of a numeric literal (optionally negated); RuleError for anything else or a non-finite value."""
    sign = -1.0 if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) else 1.0
    node = node.operand if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)) else node
    if not (isinstance(node, ast.Constant) and type(node.value) in (int, float)):  # no str, bool, None, ..., complex
        raise RuleError(f"{ast.unparse(node)[:20]!r} is not a real number literal")
    try:
        value = float(node.value)
    except OverflowError:  # an integer literal beyond float range
        raise RuleError("constant is too large") from None
    if not math.isfinite(value):
        raise RuleError("constant is not finite")
    return sign * value


def compile_condition(expr: str, feats: Features) -> Callable[[], np.ndarray]:
    """Section 2.1 (2): compile one condition into a deterministic discriminator state -> {0, 1}, evaluated for all N
    states at once with NumPy. The evaluator is the whitelist: only arithmetic, comparisons, and/or/not, feature names,
    numeric literals and the functions in FUNCS are understood; any other syntax (attributes, subscripts, lambdas,
    comprehensions, strings, keywords, unknown names) is a RuleError. LLM output is never executed."""
    if not isinstance(expr, str) or not expr.strip():
        raise RuleError("condition must be a non-empty string")
    if len(expr) > MAX_EXPR_CHARS:
        raise RuleError(f"condition longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as e:
        raise RuleError(f"syntax error: {e.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_AST_NODES:
        raise RuleError(f"condition too complex (more than {MAX_AST_NODES} syntax nodes)")

    def ev(node, rows):
        # `rows`: the row indices at which features are read, composed through nested prev/next (None: the row).
        if isinstance(node, ast.Constant):
            return np.float64(number(node))
        if isinstance(node, ast.Name):
            if node.id not in feats.names:
                raise RuleError(f"unknown feature {node.id!r}")
            return feats.value(node.id, rows)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.UAdd)):
            x = ev(node.operand, rows)
            return np.logical_not(x) if isinstance(node.op, ast.Not) else -x if isinstance(node.op, ast.USub) else x
        if isinstance(node, ast.BoolOp):
            vals = [np.asarray(ev(v, rows), dtype=bool) for v in node.values]
            return (np.logical_and if isinstance(node.op, ast.And) else np.logical_or).reduce(vals)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            p = number(node.right) if isinstance(node.right, (ast.Constant, ast.UnaryOp)) else MAX_POW + 1
            if abs(p) > MAX_POW:
                raise RuleError(f"exponents must be numeric literals with |p| <= {MAX_POW}")
            a = ev(node.left, rows)
            return np.power(np.abs(a), p) * (np.sign(a) if p == int(p) and int(p) % 2 else 1.0)
        if isinstance(node, ast.BinOp) and type(node.op) in BINOPS:
            return BINOPS[type(node.op)](ev(node.left, rows), ev(node.right, rows))
        if isinstance(node, ast.Compare) and all(type(op) in CMPOPS for op in node.ops):
            left, out = ev(node.left, rows), True
            for op, comp in zip(node.ops, node.comparators):
                right = ev(comp, rows)
                out, left = np.logical_and(out, CMPOPS[type(op)](left, right)), right
            return out
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in FUNCS:
            return call(node, node.func.id, rows)
        if isinstance(node, ast.Call):
            raise RuleError(f"unknown function {ast.unparse(node.func)[:40]!r}")
        raise RuleError(
            f"'{type(node).__name__}' is not allowed (only arithmetic, comparisons, and/or/not, "
            "feature names and the listed functions)"
        )

    def call(node, fn, rows):
        f, arity = FUNCS[fn]
        n = len(node.args)
        if node.keywords or (arity is None and not 1 <= n <= 8) or (arity is not None and n != arity):
            raise RuleError(f"{fn}() takes {arity or '1 to 8'} positional arguments")
        if f is not None:
            return f(*[ev(a, rows) for a in node.args])
        k = node.args[1]
        if not (isinstance(k, ast.Constant) and type(k.value) is int and 1 <= k.value <= feats.max_lag):
            raise RuleError(f"the lag of {fn}() must be an integer literal between 1 and {feats.max_lag}")
        base = feats.idx if rows is None else rows
        shift = k.value if fn == "next" else -k.value
        other = ev(node.args[0], np.clip(base + shift, feats.ep_start[base], feats.ep_end[base]))
        return ev(node.args[0], rows) - other if fn == "delta" else other

    def discriminator() -> np.ndarray:
        with np.errstate(all="ignore"):
            out = np.broadcast_to(np.asarray(ev(tree, None)), (feats.n,))
        if out.dtype != bool:
            raise RuleError("condition is not a comparison (it must evaluate to true/false per state)")
        return out

    return discriminator


def extract_rules_json(text: str) -> List[dict]:
    """Pull the {"rules": [...]} object out of an LLM answer (code fences and chatter tolerated); bounded sizes."""
    text = text[:20_000]
    for cand in re.findall(r"```(?:json)?\s*(.*?)```", text, re.S) + [text]:
        start = cand.find("{")
        while start != -1:
            try:
                obj, _ = json.JSONDecoder().raw_decode(cand[start:])
                if isinstance(obj, dict) and isinstance(obj.get("rules"), list):
                    return [r for r in obj["rules"][:16] if isinstance(r, dict)]
            except json.JSONDecodeError:
                pass
            start = cand.find("{", start + 1)
    raise RuleError("no JSON object with a 'rules' list found in the answer")


def check_rules(rules: List[dict], feats: Features, valid_rows: np.ndarray):
    """Compile-time self-check: each rule must parse, run and fire on a fraction of states in
    [RULE_MIN_FIRE, RULE_MAX_FIRE]. Returns (accepted rules with their masks and fire rates, failures with reasons)."""
    accepted, failures = [], []
    for i, r in enumerate(rules):
        name = str(r.get("name", f"rule_{i}"))[:64]
        cond = r.get("condition")
        try:
            if cond is None:
                raise RuleError('the rule has no "condition" field')
            mask = compile_condition(cond, feats)()
            frac = float(mask[valid_rows].mean())
            if not RULE_MIN_FIRE <= frac <= RULE_MAX_FIRE:
                raise RuleError(f"fires on {frac:.2%} of states, outside [{RULE_MIN_FIRE:.2%}, {RULE_MAX_FIRE:.2%}]")
            desc = str(r.get("description", ""))[:300]
            accepted.append({"name": name, "description": desc, "condition": cond, "fire_rate": frac, "mask": mask})
        except RuleError as e:
            failures.append({"name": name, "condition": str(cond)[:MAX_EXPR_CHARS], "error": str(e)})
        except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as e:
            # Defensive: anything the validator did not foresee rejects the rule instead of crashing the run.
            failures.append(
                {
                    "name": name,
                    "condition": str(cond)[:MAX_EXPR_CHARS],
                    "error": f"could not be evaluated ({type(e).__name__})",
                }
            )
    return accepted, failures


def read_prompt(prompts_dir: Path, name: str) -> str:
    return (prompts_dir / "keystate" / name).read_text().split("\n---\n", 1)[1].strip()


def layout_file_for(env_name: str, prompts_dir: Path) -> Path:
    """pointmaze-* / antmaze-* / cube-single-* have layout descriptions in prompts/keystate/."""
    for prefix, fname in (("pointmaze-", "pointmaze"), ("antmaze-", "antmaze"), ("cube-single-", "cube_single")):
        if env_name.startswith(prefix):
            return prompts_dir / "keystate" / f"layout_{fname}.md"
    raise SystemExit(
        f"error: no observation-layout description for {env_name!r} in {prompts_dir}/keystate "
        f"(pass --layout-path, or --rules-path, or --relabel her)"
    )


def generate_rules(args: Args, feats: Features, layout_body: str, valid_rows: np.ndarray, prompts_dir: Path, log):
    """Section 2.1 (1) + compile-time self-check: ask the LLM for rules, compile and calibrate them, send the failures
    back in the repair prompt for at most --max-repair-rounds rounds. An LLM request that fails (None) is a failed
    round. Returns (accepted rules, possibly empty; counts of rejected rules and failed requests)."""
    client = LLMClient(args)
    # The layout file's "Task: ..." paragraph (up to its "Features:" line) is the task description.
    task_part, _, feature_part = layout_body.partition("\nFeatures:")
    functions = ", ".join(FUNCS)
    fields = dict(
        env_name=args.env_name,
        task_description=" ".join(task_part.removeprefix("Task:").split()),
        observation_layout=feature_part.strip(),
        features=", ".join(feats.names),
        functions=functions,
        max_lag=feats.max_lag,
        num_rules=args.num_rules,
        min_fire=f"{RULE_MIN_FIRE:.1%}",
        max_fire=f"{RULE_MAX_FIRE:.1%}",
    )
    prompt = Template(read_prompt(prompts_dir, "rule_generation.md")).substitute(fields)
    accepted, rejected = [], 0
    for round_ in range(args.max_repair_rounds + 1):
        t0 = time.time()
        answer = client.chat([[{"role": "user", "content": prompt}]])[0]
        if answer is None:  # counted by the client; the next round asks again
            log(f"[rules] LLM round {round_} failed (no answer)")
            continue
        log(f"[rules] LLM round {round_} answered in {time.time() - t0:.1f}s: {answer[:300]!r}")
        try:
            good, failures = check_rules(extract_rules_json(answer), feats, valid_rows)
        except RuleError as e:
            good, failures = [], [{"name": "(whole answer)", "condition": answer[:200], "error": str(e)}]
        known = {r["condition"] for r in accepted}
        accepted += [g for g in good if g["condition"] not in known]
        rejected += len(failures)
        for f in failures:
            log(f"[rules] rejected {f['name']}: {f['error']}")
        if not failures or len(accepted) >= args.num_rules:
            break
        lines = "\n".join(f"- {f['name']}: {f['condition']!r} -> {f['error']}" for f in failures)
        prompt = Template(read_prompt(prompts_dir, "rule_repair.md")).substitute(fields, failures=lines)
    return accepted, {"rejected_rules": rejected, "llm_failures": client.failures}


def load_rules_file(path: str) -> List[dict]:
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: rules file {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("rules"), list):
        raise SystemExit(f'error: rules file {path} must hold an object {{"rules": [...]}}')
    return [r for r in obj["rules"] if isinstance(r, dict)]


def build_keystate_mask(args: Args, ds: Dataset, prompts_dir: Path, run_dir: Path, log):
    """Components (1) + (2) with the compile-time self-check: rules from --rules-path or from the LLM, compiled and
    calibrated on this dataset, OR-ed into one key-state mask over all rows. Saves runs/{run_name}/rules.json.
    Returns (mask, or None when no rule survived -> HER fallback; accepted rules)."""
    valid_rows = ds.valids > 0
    layout_path = Path(args.layout_path) if args.layout_path else layout_file_for(args.env_name, prompts_dir)
    layout_body, names = parse_layout(layout_path.read_text())
    feats = Features(ds.observations, *episode_index(ds), names)
    if args.rules_path:
        rules, failures = check_rules(load_rules_file(args.rules_path), feats, valid_rows)
        for f in failures:
            log(f"[rules] rejected {f['name']} from {args.rules_path}: {f['error']}")
        stats = {"rejected_rules": len(failures), "llm_failures": 0}
    else:
        rules, stats = generate_rules(args, feats, layout_body, valid_rows, prompts_dir, log)
    saved = [{k: r[k] for k in ("name", "description", "condition", "fire_rate")} for r in rules]
    out = {"env_name": args.env_name, "features": feats.names, "max_lag": feats.max_lag, "rules": saved, **stats}
    (run_dir / "rules.json").write_text(json.dumps(out, indent=2))
    log(
        f"[rules] {len(rules)} accepted, {stats['rejected_rules']} rejected, {stats['llm_failures']} failed LLM requests"
    )
    if not rules:
        log("[rules] WARNING: no valid rule survived the self-check; falling back to HER relabeling")
        return None, rules
    key_mask = np.logical_or.reduce([r["mask"] for r in rules])
    for r in rules:
        log(f"[rules] accepted {r['name']} ({r['fire_rate']:.2%} of states): {r['condition']}")
    log(f"[rules] key states: {int((key_mask & valid_rows).sum())} ({(key_mask & valid_rows).mean():.2%} of rows)")
    return key_mask, rules


# ======================================================================================================================
# Goal sampling: OGBench's HER mixture + key-state-prioritised relabeling (3), all on device; relabel-time self-check
# ======================================================================================================================
class GoalData(NamedTuple):
    """Device arrays the jitted sampler reads (passed as arguments, not baked in as constants)."""

    observations: jax.Array  # (N, ob_dim)
    actions: jax.Array  # (N, act_dim)
    valid_idxs: jax.Array  # (M,) rows that have a next state
    final_idxs: jax.Array  # (N,) last goal row of each row's episode: its last valid row (OGBench's terminal_locs)
    key_idxs: jax.Array  # (K,) sorted rows that satisfy at least one discriminator (K >= 1; sentinel N when empty)


@dataclass(frozen=True)
class GoalConfig:
    """Static goal-mixture settings (hashable, so jit specialises on them)."""

    discount: float
    actor_p_randomgoal: float  # actor goals: random state, else uniform-future state (OGBench's per-env value)
    keystate: bool  # key-state relabeling on (a rule survived the self-check)
    keystate_window: int
    keystate_actor_goals: bool


def make_goal_data(ds: Dataset, key_mask: Optional[np.ndarray]) -> GoalData:
    ep_start, ep_end = episode_index(ds)
    final = np.maximum(
        ep_end - 1, ep_start
    )  # OGBench: terminal_locs[searchsorted(terminal_locs, idx)] = last valid row
    key_idxs = np.nonzero(key_mask & (ds.valids > 0))[0] if key_mask is not None else np.zeros(0, np.int64)
    if len(key_idxs) == 0:
        key_idxs = np.array([len(ds.valids)])  # sentinel: searchsorted then finds no key state in any window
    valid_idxs = np.nonzero(ds.valids > 0)[0]
    return GoalData(
        jnp.asarray(ds.observations),
        jnp.asarray(ds.actions),
        jnp.asarray(valid_idxs, jnp.int32),
        jnp.asarray(final, jnp.int32),
        jnp.asarray(key_idxs, jnp.int32),
    )


def keystate_goals(key, idxs, final, key_idxs, window):
    """Section 2.1 (3): a key state uniformly among those in (t, min(t + window, final)] of the same trajectory.
    Vectorised with searchsorted over the sorted key indices. Returns (goal rows, whether one existed)."""
    lo = jnp.searchsorted(key_idxs, idxs, side="right")  # first key state strictly after t
    hi = jnp.searchsorted(key_idxs, jnp.minimum(idxs + window, final), side="right")
    count = hi - lo
    pick = lo + jnp.floor(jax.random.uniform(key, idxs.shape) * count).astype(jnp.int32)
    goals = key_idxs[jnp.clip(pick, 0, key_idxs.shape[0] - 1)]
    return goals, count > 0


def sample_goals(key, data: GoalData, idxs, p_cur, p_traj, geom, discount, p_key, use_key, window):
    """OGBench GCDataset.sample_goals (impls/utils/datasets.py), with the future-state (HER) branch replaced by a
    key-state goal w.p. p_key when one exists in the window. Returns goal rows, is-key-goal, is-HER-future-goal."""
    k_rand, k_geom, k_mix, k_cur, k_key, k_use = jax.random.split(key, 6)
    b = idxs.shape[0]
    random_goals = data.valid_idxs[jax.random.randint(k_rand, (b,), 0, data.valid_idxs.shape[0])]
    final = data.final_idxs[idxs]
    if geom:  # geometric offsets in [1, inf) with success prob 1 - discount (value goals)
        offsets = jax.random.geometric(k_geom, 1.0 - discount, (b,)).astype(jnp.int32)
        traj_goals = jnp.minimum(idxs + offsets, final)
    else:  # uniform over (t, final] (actor goals), rounded as in OGBench
        u = jax.random.uniform(k_geom, (b,))
        traj_goals = jnp.round(jnp.minimum(idxs + 1, final) * u + final * (1 - u)).astype(jnp.int32)
    is_traj = jax.random.uniform(k_mix, (b,)) < p_traj / max(1.0 - p_cur, 1e-8)
    is_key = jnp.zeros((b,), bool)
    if use_key:
        key_goals, has_key = keystate_goals(k_key, idxs, final, data.key_idxs, window)
        is_key = is_traj & has_key & (jax.random.uniform(k_use, (b,)) < p_key)
        traj_goals = jnp.where(is_key, key_goals, traj_goals)  # no key state in window -> HER goal, unchanged
    goals = jnp.where(is_traj, traj_goals, random_goals)
    is_cur = jax.random.uniform(k_cur, (b,)) < p_cur
    goals = jnp.where(is_cur, idxs, goals)
    return goals, is_key & ~is_cur, is_traj & ~is_key & ~is_cur


def keystate_subgoal(key, idxs, subgoal_idxs, key_idxs, p_key):
    """EXTENSION (not tested in the paper; off unless --keystate-subgoals): w.p. p_key replace HIQL's subgoal
    s_{t+k} by the *last* key state in (t, t+k], so subgoals land on key states while staying as close to k steps
    ahead as possible. Where the window holds no key state, the subgoal is unchanged. Returns (rows, replaced)."""
    pos = jnp.searchsorted(key_idxs, subgoal_idxs, side="right") - 1  # last key state <= the subgoal row
    cand = key_idxs[jnp.maximum(pos, 0)]
    ok = (pos >= 0) & (cand > idxs) & (jax.random.uniform(key, idxs.shape) < p_key)
    return jnp.where(ok, cand, subgoal_idxs), ok


def sample_batch(key, data: GoalData, batch_size: int, cfg: GoalConfig, p_keystate, subgoal_steps, keystate_subgoals):
    """A HIQL batch (OGBench HGCDataset.sample): value goals with -1/0 rewards (gc_negative=True), the low-level
    subgoal w = s_{min(t+k, T)}, and high-level goals g with prediction targets s_{min(t+k, g)}."""
    k_idx, k_val, k_act, k_low, k_high = jax.random.split(key, 5)
    idxs = data.valid_idxs[jax.random.randint(k_idx, (batch_size,), 0, data.valid_idxs.shape[0])]
    gamma, p_key, window = cfg.discount, p_keystate, cfg.keystate_window
    value_goal_idxs, value_is_key, value_is_her = sample_goals(
        k_val, data, idxs, VALUE_P_CURGOAL, VALUE_P_TRAJGOAL, True, gamma, p_key, cfg.keystate, window
    )
    # High-level goals: uniform-future (or key-state) goals of the same trajectory, or random states.
    actor_key = cfg.keystate and cfg.keystate_actor_goals
    high_goal_idxs, high_is_key, high_is_her = sample_goals(
        k_act, data, idxs, 0.0, 1.0 - cfg.actor_p_randomgoal, False, gamma, p_key, actor_key, window
    )
    low_goal_idxs = jnp.minimum(idxs + subgoal_steps, data.final_idxs[idxs])
    # The high-level target never overshoots its goal; for random goals it is s_{min(t+k, T)} (as OGBench).
    in_traj = high_is_key | high_is_her
    high_target_idxs = jnp.where(in_traj, jnp.minimum(idxs + subgoal_steps, high_goal_idxs), low_goal_idxs)
    low_is_key = jnp.zeros((batch_size,), bool)
    if cfg.keystate and keystate_subgoals:
        low_goal_idxs, low_is_key = keystate_subgoal(k_low, idxs, low_goal_idxs, data.key_idxs, p_keystate)
        high_target_idxs, _ = keystate_subgoal(k_high, idxs, high_target_idxs, data.key_idxs, p_keystate)
    successes = (idxs == value_goal_idxs).astype(jnp.float32)
    return {
        "observations": data.observations[idxs],
        "next_observations": data.observations[idxs + 1],  # compact layout: valid rows have a next row
        "actions": data.actions[idxs],
        "value_goals": data.observations[value_goal_idxs],
        "low_actor_goals": data.observations[low_goal_idxs],
        "high_actor_goals": data.observations[high_goal_idxs],
        "high_actor_targets": data.observations[high_target_idxs],
        "rewards": successes - 1.0,
        "masks": 1.0 - successes,
        "value_goal_is_key": value_is_key,
        "value_goal_is_her": value_is_her,
        "subgoal_is_key": low_is_key,
    }


class RelabelCheck:
    """Relabel-time self-check (Section 2.1): key-state goals should induce larger TD errors than HER goals (the
    premise of Theorem 2.1). Every --adapt-interval steps, p_keystate moves up by ADAPT_STEP if the interval's mean
    |TD| of key-state goals is at least that of HER goals, else down (the paper gives no rule; this bounded additive
    one is ours). Also keeps the TD errors of one batch every TD_HIST_INTERVAL steps for Figure 2."""

    def __init__(self, args: Args, use_key: bool):
        self.p_keystate = args.p_keystate if use_key else 0.0
        self.interval = args.adapt_interval if use_key else 0
        self.acc = jnp.zeros(4)  # sums and counts of |TD| of key-state and HER goals, on device over the interval
        names = [f"relabel/td_{k}" for k in ("key_sum", "key_count", "her_sum", "her_count")]
        self.add = jax.jit(lambda acc, info: acc + jnp.stack([info[k] for k in names]))
        self.steps, self.td_key, self.td_her = [], [], []

    def observe(self, step: int, info, td_batch, writer, last: bool):
        if self.interval:
            self.acc = self.add(self.acc, info)
        if self.interval and step % self.interval == 0:
            key_sum, key_n, her_sum, her_n = np.asarray(self.acc)
            if key_n > 0 and her_n > 0:
                td_key, td_her = key_sum / key_n, her_sum / her_n
                self.p_keystate += ADAPT_STEP if td_key >= td_her else -ADAPT_STEP
                self.p_keystate = float(np.clip(self.p_keystate, P_KEYSTATE_MIN, P_KEYSTATE_MAX))
                writer.add_scalar("relabel/td_key_mean", td_key, step)
                writer.add_scalar("relabel/td_her_mean", td_her, step)
            self.acc = jnp.zeros(4)
        if step % TD_HIST_INTERVAL == 0 or last:
            td, is_key, is_her = map(np.asarray, td_batch)
            self.steps.append(step)
            self.td_key.append(td[is_key])
            self.td_her.append(td[is_her])
            for name, sel in (("keystate", is_key), ("her", is_her)):
                if sel.any():
                    writer.add_histogram(f"relabel/td_{name}_goals", td[sel], step)


# ======================================================================================================================
# Networks (as OGBench impls/utils/networks.py)
# ======================================================================================================================
def default_init(scale: float = 1.0):
    return nn.initializers.variance_scaling(scale, "fan_avg", "uniform")


class MLP(nn.Module):
    """Dense -> GELU -> LayerNorm blocks (OGBench's MLP ordering)."""

    hidden_dims: Tuple[int, ...]
    activate_final: bool = False
    layer_norm: bool = False

    @nn.compact
    def __call__(self, x):
        for i, size in enumerate(self.hidden_dims):
            x = nn.Dense(size, kernel_init=default_init())(x)
            if i + 1 < len(self.hidden_dims) or self.activate_final:
                x = nn.gelu(x)
                if self.layer_norm:
                    x = nn.LayerNorm()(x)
        return x


class GCValue(nn.Module):
    """V(s, g) (ensemble=1) or two vmapped heads (ensemble=2: GCIQL's Q1,2(s, g, a), HIQL's V1,2(s, phi)); LayerNorm
    on, as OGBench's value networks."""

    hidden_dims: Tuple[int, ...]
    ensemble: int = 1

    @nn.compact
    def __call__(self, observations, goals, actions=None):
        x = jnp.concatenate([observations, goals] + ([actions] if actions is not None else []), axis=-1)
        mlp = MLP
        if self.ensemble > 1:
            mlp = nn.vmap(
                MLP,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=None,
                out_axes=0,
                axis_size=self.ensemble,
            )
        return mlp((*self.hidden_dims, 1), activate_final=False, layer_norm=True)(x).squeeze(-1)


class GCActor(nn.Module):
    """Gaussian policy pi(a | s, g) -> (mean, log_std) with constant unit std and no LayerNorm (OGBench defaults)."""

    hidden_dims: Tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, observations, goals):
        h = MLP(self.hidden_dims, activate_final=True)(jnp.concatenate([observations, goals], axis=-1))
        mean = nn.Dense(self.action_dim, kernel_init=default_init(1e-2))(h)
        return mean, jnp.zeros_like(mean)


def gaussian_log_prob(mean, log_std, actions):
    """log N(actions; mean, diag(exp(log_std)^2)), summed over action dims. (batch,)"""
    z = (actions - mean) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


class AgentState(NamedTuple):
    params: Dict[str, Any]  # the optimised parameters of every module, under one Adam (as OGBench's TrainState)
    target: Any  # soft target copy of the bootstrapping network (GCIQL: the critic; HIQL: the value heads)
    opt_state: Any
    rng: jax.Array


class GoalRep(nn.Module):
    """HIQL's subgoal representation phi([s; g]): an MLP to rep_dim, normalised to length sqrt(rep_dim) (OGBench's
    LengthNormalize). One set of parameters serves V(s, phi([s; g])) and the low-level actor pi(a | s, phi([s; w]))."""

    hidden_dims: Tuple[int, ...]
    rep_dim: int

    @nn.compact
    def __call__(self, observations, goals):
        x = MLP((*self.hidden_dims, self.rep_dim), layer_norm=True)(jnp.concatenate([observations, goals], axis=-1))
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True) * jnp.sqrt(self.rep_dim)


class Nets(NamedTuple):
    goal_rep: GoalRep  # phi([s; g])
    value: GCValue  # V1,2(s, phi): two heads, vmapped
    low_actor: GCActor  # pi^l(a | s, phi([s; w]))
    high_actor: GCActor  # pi^h(phi([s; w]) | s, g): a Gaussian over representations


def make_agent(args: Args, ob_dim: int, act_dim: int, key):
    hd = tuple(args.hidden_dims)
    nets = Nets(GoalRep(hd, REP_DIM), GCValue(hd, 2), GCActor(hd, act_dim), GCActor(hd, REP_DIM))
    k_r, k_v, k_l, k_h, k_rng = jax.random.split(key, 5)
    ob, rep = jnp.zeros((1, ob_dim)), jnp.zeros((1, REP_DIM))

    @jax.jit  # one compilation instead of hundreds of eager ops (about 20 s on a busy 2-core CPU)
    def init(k_r, k_v, k_l, k_h):
        return {
            "goal_rep": nets.goal_rep.init(k_r, ob, ob)["params"],
            "value": nets.value.init(k_v, ob, rep)["params"],
            "low_actor": nets.low_actor.init(k_l, ob, rep)["params"],
            "high_actor": nets.high_actor.init(k_h, ob, ob)["params"],
        }

    params = init(k_r, k_v, k_l, k_h)
    tx = optax.adam(args.lr)
    target = jax.tree_util.tree_map(jnp.copy, params["value"])  # starts equal, own buffers (donation)
    return nets, tx, AgentState(params, target, tx.init(params), k_rng)


# ======================================================================================================================
# Losses and update (HIQL, OGBench impls/agents/hiql.py)
# ======================================================================================================================
def expectile_loss(adv, diff, expectile):
    """IQL expectile regression |tau - 1(adv < 0)| * diff^2 (GCIQL: adv = diff; HIQL takes the sign from the target
    network's advantage, as OGBench hiql.py)."""
    weight = jnp.where(adv >= 0, expectile, 1 - expectile)
    return weight * diff**2


def relabel_info(info, batch):
    """Per-step relabeling scalars (share of key-state goals; |TD| sums and counts of key-state vs HER value goals,
    accumulated by the relabel-time self-check) and the batch's (|TD|, is-key, is-HER) for Figure 2."""
    td, is_key, is_her = info.pop("td_abs"), batch["value_goal_is_key"], batch["value_goal_is_her"]
    info["relabel/frac_keystate_goals"] = is_key.mean()
    info["relabel/td_key_sum"], info["relabel/td_key_count"] = jnp.sum(td * is_key), is_key.sum()
    info["relabel/td_her_sum"], info["relabel/td_her_count"] = jnp.sum(td * is_her), is_her.sum()
    return info, (td, is_key, is_her)


def hiql_value(nets: Nets, value_params, rep_params, observations, goals):
    """V1,2(s, phi([s; g])) -> (2, batch)."""
    reps = nets.goal_rep.apply({"params": rep_params}, observations, goals)  # (batch, rep_dim)
    return nets.value.apply({"params": value_params}, observations, reps)


def value_loss(params, target_value_params, batch, nets: Nets, discount, expectile):
    """Action-free goal-conditioned IQL value loss (HIQL paper Eq. 3): both heads regress to
    r + discount * mask * V_target(s', g) with the expectile weight of A = q - V_target(s, g), q from min of the heads.
    phi is trained here only (through the online heads). Also returns the per-sample TD error |q - V(s, g)| used by
    the relabel-time self-check."""
    obs, next_obs, goals = batch["observations"], batch["next_observations"], batch["value_goals"]
    rep_sg = jax.lax.stop_gradient(params["goal_rep"])  # the target heads read the current phi, not differentiated
    next_v1_t, next_v2_t = hiql_value(nets, target_value_params, rep_sg, next_obs, goals)  # (batch,) each
    q = batch["rewards"] + discount * batch["masks"] * jnp.minimum(next_v1_t, next_v2_t)
    adv = q - hiql_value(nets, target_value_params, rep_sg, obs, goals).mean(0)
    q1 = batch["rewards"] + discount * batch["masks"] * next_v1_t
    q2 = batch["rewards"] + discount * batch["masks"] * next_v2_t
    v1, v2 = hiql_value(nets, params["value"], params["goal_rep"], obs, goals)
    loss = expectile_loss(adv, q1 - v1, expectile).mean() + expectile_loss(adv, q2 - v2, expectile).mean()
    v = (v1 + v2) / 2
    td_abs = jax.lax.stop_gradient(jnp.abs(q - v))  # (batch,)
    return loss, {
        "value/value_loss": loss,
        "value/v_mean": v.mean(),
        "value/v_max": v.max(),
        "value/v_min": v.min(),
        "td_abs": td_abs,
    }


def low_actor_loss(params, batch, nets: Nets, alpha, rep_grad):
    """Low-level AWR (HIQL Eq. 6): -min(exp(alpha * (V(s', w) - V(s, w))), 100) * log pi^l(a | s, phi([s; w]))
    with the subgoal w = s_{t+k}. V and phi are fixed here (phi gets gradients only if --low-actor-rep-grad)."""
    obs, actions, w = batch["observations"], batch["actions"], batch["low_actor_goals"]
    frozen = jax.lax.stop_gradient(params)
    v = hiql_value(nets, frozen["value"], frozen["goal_rep"], obs, w).mean(0)  # (batch,)
    nv = hiql_value(nets, frozen["value"], frozen["goal_rep"], batch["next_observations"], w).mean(0)
    adv = nv - v
    exp_a = jnp.minimum(jnp.exp(adv * alpha), 100.0)
    reps = nets.goal_rep.apply({"params": params["goal_rep"] if rep_grad else frozen["goal_rep"]}, obs, w)
    mean, log_std = nets.low_actor.apply({"params": params["low_actor"]}, obs, reps)  # (batch, act_dim)
    log_prob = gaussian_log_prob(mean, log_std, actions)
    loss = -(exp_a * log_prob).mean()
    return loss, {
        "low_actor/actor_loss": loss,
        "low_actor/adv": adv.mean(),
        "low_actor/bc_log_prob": log_prob.mean(),
        "low_actor/mse": jnp.mean((mean - actions) ** 2),
        "low_actor/std": jnp.exp(log_std).mean(),
    }


def high_actor_loss(params, batch, nets: Nets, alpha):
    """High-level AWR (HIQL Eq. 5): -min(exp(alpha * (V(s_{t+k}, g) - V(s, g))), 100) * log pi^h(phi([s; s_{t+k}]) | s, g);
    the high-level actor outputs a subgoal *representation*, regressed onto the fixed phi of the target state."""
    obs, goals, targets = batch["observations"], batch["high_actor_goals"], batch["high_actor_targets"]
    frozen = jax.lax.stop_gradient(params)
    v = hiql_value(nets, frozen["value"], frozen["goal_rep"], obs, goals).mean(0)  # (batch,)
    nv = hiql_value(nets, frozen["value"], frozen["goal_rep"], targets, goals).mean(0)
    adv = nv - v
    exp_a = jnp.minimum(jnp.exp(adv * alpha), 100.0)
    mean, log_std = nets.high_actor.apply({"params": params["high_actor"]}, obs, goals)  # (batch, rep_dim)
    target = nets.goal_rep.apply({"params": frozen["goal_rep"]}, obs, targets)  # (batch, rep_dim)
    log_prob = gaussian_log_prob(mean, log_std, target)
    loss = -(exp_a * log_prob).mean()
    return loss, {
        "high_actor/actor_loss": loss,
        "high_actor/adv": adv.mean(),
        "high_actor/bc_log_prob": log_prob.mean(),
        "high_actor/mse": jnp.mean((mean - target) ** 2),
        "high_actor/std": jnp.exp(log_std).mean(),
    }


def make_update(args: Args, nets: Nets, tx, goal_cfg: GoalConfig):
    """Jitted train step: sample a relabeled batch on device, one Adam step on the value + low-level + high-level
    losses, soft target update. Returns the new state, per-step scalars and (|TD|, is-key-goal, is-HER-goal)."""

    def total_loss(params, target_value, batch):
        v_loss, v_info = value_loss(params, target_value, batch, nets, args.discount, args.expectile)
        l_loss, l_info = low_actor_loss(params, batch, nets, args.low_alpha, LOW_ACTOR_REP_GRAD)
        h_loss, h_info = high_actor_loss(params, batch, nets, args.high_alpha)
        return v_loss + l_loss + h_loss, {**v_info, **l_info, **h_info}

    def update(state: AgentState, data: GoalData, p_keystate):
        rng, k_batch = jax.random.split(state.rng)
        batch = sample_batch(
            k_batch, data, args.batch_size, goal_cfg, p_keystate, args.subgoal_steps, args.keystate_subgoals
        )
        grads, info = jax.grad(total_loss, has_aux=True)(state.params, state.target, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # OGBench blends the value parameters from *before* this step into the target (hiql.py target_update).
        target = jax.tree_util.tree_map(lambda p, tp: TAU * p + (1 - TAU) * tp, state.params["value"], state.target)
        info["relabel/frac_keystate_subgoals"] = batch["subgoal_is_key"].mean()
        return AgentState(params, target, opt_state, rng), *relabel_info(info, batch)

    # Donating the old state lets XLA update parameters and Adam moments in place (no per-step copies).
    return jax.jit(update, donate_argnums=(0,))


def make_policy(nets: Nets):
    """OGBench's HIQL sample_actions at eval_temperature=0: the high-level mean, renormalised to length
    sqrt(rep_dim), is the subgoal representation for the low-level actor, whose mean (clipped) is the action."""

    @jax.jit
    def act(params, obs, goal):
        rep, _ = nets.high_actor.apply({"params": params["high_actor"]}, obs[None], goal[None])
        rep = rep / jnp.linalg.norm(rep, axis=-1, keepdims=True) * jnp.sqrt(rep.shape[-1])
        mean, _ = nets.low_actor.apply({"params": params["low_actor"]}, obs[None], rep)
        return jnp.clip(mean[0], -1, 1)

    return act


# ======================================================================================================================
# Evaluation (OGBench protocol: 5 tasks, success rate per task and overall)
# ======================================================================================================================
def evaluate(env, act, params, args: Args) -> Dict[str, float]:
    """Run --eval-episodes per task (env.reset(options=dict(task_id=i))); success = info['success'] at the end."""
    task_infos = env.unwrapped.task_infos
    results = {}
    for task_id in range(1, min(args.eval_tasks or len(task_infos), len(task_infos)) + 1):
        successes = []
        for ep in range(args.eval_episodes):
            obs, info = env.reset(
                seed=args.seed + 1000 * task_id + ep, options=dict(task_id=task_id, render_goal=False)
            )
            goal = jnp.asarray(info["goal"], jnp.float32)
            done = False
            while not done:
                action = np.asarray(act(params, jnp.asarray(obs, jnp.float32), goal))
                obs, _, terminated, truncated, info = env.step(action)
                done = terminated or truncated
            successes.append(float(info.get("success", 0.0)))
        name = task_infos[task_id - 1].get("task_name", f"task{task_id}")
        results[f"eval/{name}_success"] = float(np.mean(successes))
    results["eval/overall_success"] = float(np.mean(list(results.values())))
    return results


def save_td_errors(run_dir: Path, check: RelabelCheck):
    """Figure 2 of the paper: the TD errors of key-state goals vs HER goals (histograms also in TensorBoard)."""
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    n_key, n_her = [len(x) for x in check.td_key], [len(x) for x in check.td_her]  # to split the arrays per step
    np.savez(
        run_dir / "td_errors.npz",
        td_keystate=cat(check.td_key),
        td_her=cat(check.td_her),
        steps=np.asarray(check.steps),
        n_keystate_per_step=np.asarray(n_key),
        n_her_per_step=np.asarray(n_her),
    )


def make_writer(args: Args, run_name: str, run_dir: Path):
    """TensorBoard always (runs/{run_name}), W&B with --track; the hyperparameters as a table."""
    from torch.utils.tensorboard import SummaryWriter  # torch is a pinned dependency

    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    writer = SummaryWriter(str(run_dir))
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )
    return writer


# ======================================================================================================================
# Main: rules -> discriminators -> key-state mask, then offline training with key-state-prioritised relabeling
# ======================================================================================================================
def main(args: Args):
    check_args(args)
    args = resolve_presets(args)
    run_name = f"{args.env_name}__{args.exp_name}__{args.relabel}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.run_dir) / run_name
    random.seed(args.seed)  # LLM requests carry the seed too, and decode greedily by default
    np.random.seed(args.seed)
    key = jax.random.PRNGKey(args.seed)
    log = tqdm.write

    env = make_env(args.env_name)
    ob_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    ds = load_dataset(args, ob_dim, act_dim)
    log(
        f"[data] {args.env_name}: {len(ds.valids)} rows, {int((ds.valids == 0).sum())} episodes, "
        f"ob_dim={ob_dim}, act_dim={act_dim}, fraction={args.dataset_fraction}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)  # only once the environment and the dataset are known to be valid
    writer = make_writer(args, run_name, run_dir)

    # Components (1) + (2) and the compile-time self-check; None -> HER fallback.
    key_mask = build_keystate_mask(args, ds, PROMPTS, run_dir, log)[0] if args.relabel == "keystate" else None
    writer.add_scalar("charts/keystate_share", 0.0 if key_mask is None else float(key_mask.mean()), 0)
    use_key = key_mask is not None
    data = make_goal_data(ds, key_mask)
    goal_cfg = GoalConfig(
        args.discount, actor_p_randomgoal(args.env_name), use_key, args.keystate_window, args.keystate_actor_goals
    )
    key, k_agent = jax.random.split(key)
    nets, tx, state = make_agent(args, ob_dim, act_dim, k_agent)
    update, act = make_update(args, nets, tx, goal_cfg), make_policy(nets)
    check = RelabelCheck(args, use_key)

    # Component (4): offline training; only the relabeling differs from the learner's reference implementation.
    eval_points = set(range(args.eval_interval, args.total_steps + 1, args.eval_interval or args.total_steps))
    start, last_t, last_step, n_key_goals, results = time.time(), time.time(), 0, 0, {}
    for step in tqdm(range(1, args.total_steps + 1), smoothing=0.1, dynamic_ncols=True):
        state, info, td_batch = update(state, data, jnp.float32(check.p_keystate))
        last = step == args.total_steps
        check.observe(step, info, td_batch, writer, last)
        if step % args.log_interval == 0 or last:
            sps = (step - last_step) / (time.time() - last_t)
            last_t, last_step = time.time(), step
            scalars = {k: float(v) for k, v in info.items() if not k.endswith(("_sum", "_count"))}
            for k, v in scalars.items():
                writer.add_scalar(k if k.startswith("relabel/") else f"losses/{k}", v, step)
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("relabel/p_keystate", check.p_keystate, step)
            n_key_goals += int(info["relabel/td_key_count"])
            losses = " ".join(
                f"{k.split('/')[0]}_loss={v:.4f}"
                for k, v in scalars.items()
                if k.split("/")[1] in ("value_loss", "critic_loss", "actor_loss")
            )
            log(
                f"step={step} SPS={sps:.1f} {losses} keystate_goals_in_batch={int(info['relabel/td_key_count'])} "
                f"p_keystate={check.p_keystate:.3f}"
            )
        if step in eval_points or last:
            results = evaluate(env, act, state.params, args)
            for k, v in results.items():
                writer.add_scalar(k, v, step)
            log(f"eval step={step} " + " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in results.items()))
            last_t = time.time()  # keep evaluation time out of the next SPS reading

    total_time = time.time() - start
    log(
        f"done: {args.total_steps} gradient steps in {total_time:.1f}s ({args.total_steps / total_time:.1f} steps/s); "
        f"relabeling: {n_key_goals} key-state value goals sampled in logged batches"
    )
    save_td_errors(run_dir, check)
    from flax import serialization

    (run_dir / "params.msgpack").write_bytes(serialization.to_bytes(state.params))
    (run_dir / "final_eval.json").write_text(json.dumps(results, indent=2))
    log(f"saved to {run_dir}")
    writer.close()
    env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
