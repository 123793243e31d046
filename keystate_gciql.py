"""LLM-Driven Relabeling (key-state-prioritised goal relabeling) on top of GCIQL, on OGBench.

Paper: Gao, Sun, Wang, Zheng, "Better Goals, Better Policies: LLM-Driven Relabeling for Offline
Goal-Conditioned Reinforcement Learning", AAMAS 2026 extended abstract (no arXiv version).
Figure 1: (1) `generate_rules` asks an LLM for semantic rules that describe key states;
(2) `compile_condition` turns each rule into a discriminator (LLM output is never executed);
(3) `keystate_goals` relabels value goals with key states of the same trajectory, within a window;
(4) GCIQL as OGBench's impls/agents/gciql.py trains on them, only relabeling changed.
Self-checks: `check_rules` (compile time), `RelabelCheck` (relabel time, a paired TD probe).
Notes: docs/keystate_gciql.md.

    vllm serve Qwen/Qwen2.5-7B-Instruct   # any OpenAI-compatible endpoint writes the rules
    python keystate_gciql.py --llm-model Qwen/Qwen2.5-7B-Instruct  # on antmaze-large-navigate-v0
    # HER, reduced data, 4 seeds in one process; then reuse one LLM call across seeds
    python keystate_gciql.py --relabel her --dataset-fraction 0.5 --num-seeds 4
    python keystate_gciql.py --rules-path runs/<run>/rules.json --seed 1
"""

# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "numpy==2.4.6",
#     "scipy==1.17.1",
#     "matplotlib==3.11.2",
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

import ast
import concurrent.futures
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Literal, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import tyro
from flax import serialization
from jax.tree_util import tree_map
from tqdm import tqdm


# === Arguments ====================================================================================
@dataclass
class Args:
    """GCIQL on an OGBench dataset, relabeling goals toward key states that an LLM's rules pick
    (Gao et al., AAMAS 2026). Defaults are the paper's scale (antmaze-large, 500k steps: hours
    on a GPU); README's quick start runs in a minute on a CPU."""

    exp_name: str = Path(__file__).stem
    """the name of this experiment (part of each run folder's name)"""
    seed: int = 1
    """seed of the experiment (JAX, evaluation episodes, LLM requests, --dataset-fraction subset)"""
    num_seeds: int = 1
    """seeds --seed ... --seed + N - 1 trained in one process, one jitted update for all (vmapped
    on a GPU; on a CPU each seed runs a chunk of steps inside it, then the next)"""
    track: bool = False
    """log to Weights & Biases as well (imported only when set; $WANDB_ENTITY picks the team)"""
    wandb_project_name: str = "llm-relabeling"
    """the W&B project name"""
    run_dir: str = "runs"
    """parent folder of each run's {run_dir}/{run_name}/ (TensorBoard, rules.json, TD errors,
    params)"""
    env_name: str = "antmaze-large-navigate-v0"
    """OGBench dataset name (environment + dataset type), e.g. antmaze-large-navigate-v0,
    cube-single-play-v0"""
    dataset_path: Optional[str] = None
    """local .npz in OGBench's layout (observations, actions, terminals); unset: ogbench downloads
    the official one"""
    dataset_fraction: float = 1.0
    """fraction of episodes kept (paper's reduced-data setting: 0.5); a subset per seed, the same
    for both arms"""
    total_steps: int = 500_000
    """number of gradient steps (paper: 500,000)"""
    batch_size: int = 1024
    """batch size (OGBench: 1024)"""
    log_interval: int = 5_000
    """log losses / steps-per-second every this many steps"""
    eval_every: int = 100_000
    """evaluate every this many steps (and at the end); 0 evaluates only at the end"""
    eval_episodes: int = 50
    """evaluation episodes per task (paper / OGBench protocol: 50)"""
    relabel: Literal["her", "keystate"] = "keystate"
    """goal relabeling: OGBench's standard mixture (her) or key-state-prioritised (keystate, the
    paper's method)"""
    discount: Optional[float] = None
    """discount factor; also the geometric future-goal parameter (unset: OGBench's per-env value,
    0.99 or 0.995)"""
    rules_path: Optional[str] = None
    """JSON rule set (as saved in runs/{run_name}/rules.json); skips the LLM call"""
    # Key-state knobs: the paper publishes none of these values (ours).
    num_rules: int = 3
    """number of rules asked from the LLM"""
    p_keystate: float = 0.5
    """probability that a future-state goal is replaced by a key state within the window (initial
    value when adapted)"""
    keystate_window: int = 200
    """temporal window: key-state goals lie in (t, t + window] of the same trajectory"""
    adapt_interval: int = 1_000
    """relabel-time self-check: steps between paired TD probes that adapt p_keystate (0: p_keystate
    stays fixed)"""
    # --- LLM client (the same seven flags in every script) ----------------------------------------
    llm_backend: Literal["openai", "transformers"] = "openai"
    """openai: any OpenAI-compatible endpoint (`vllm serve`, SGLang, llama.cpp, \
`transformers serve`, hosted; key from $OPENAI_API_KEY); transformers: the model in \
this process (offline runs with small local models)"""
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
    hidden_dims: Tuple[int, ...] = (512, 512, 512)
    """hidden sizes of the value, critic and actor MLPs"""
    alpha: Optional[float] = None
    """BC coefficient of the DDPG+BC actor loss (unset: OGBench's per-env value: antmaze 0.3, cube
    1.0, ...)"""


PROMPTS = Path(__file__).resolve().parent / "prompts"  # the prompt files, next to this script
# Fixed values nobody tunes in the paper's experiments (each with the reason for its value).
TAU = 0.005  # soft target update rate, as OGBench
LR = 3e-4  # Adam learning rate, as OGBench
EXPECTILE = 0.9  # IQL expectile of the value loss, as OGBench
# A rule's temporal window: nested prev/next/delta lags add up to <= 20 steps (a turn, a grasp).
MAX_LAG = 20
# Rules read from one LLM answer or one --rules-path file; the rest are dropped with a message.
MAX_RULES = 16
MAX_REPAIR_ROUNDS = 2  # compile-time self-check: rounds of the repair prompt for rules that failed
# A rule firing on (almost) no or on many states picks no *key* states.
RULE_MIN_FIRE = 0.001
RULE_MAX_FIRE = 0.3
# `RelabelCheck`'s step, z threshold and bounds (the bounds keep both HER and key-state goals in
# the batches).
ADAPT_STEP = 0.1
ADAPT_K0 = 10
ADAPT_Z = 2.0
P_KEYSTATE_MIN = 0.05
P_KEYSTATE_MAX = 0.9
# OGBench's per-env GCIQL alpha (impls/hyperparameters.sh): the first key in the env name (explore:
# antmaze only).
GCIQL_ALPHA = {
    "explore": 0.01,
    "pointmaze": 0.003,
    "humanoidmaze": 0.1,
    "antsoccer": 0.1,
    "antmaze": 0.3,
    "-noisy": 0.03,
    "cube": 1.0,
    "scene": 1.0,
    "puzzle": 1.0,
}
# goal data that differ per seed (--dataset-fraction); the dataset is shared
PER_SEED = ("valid_idxs", "n_valid")

# Declared range [low, high] (inclusive) of every int and float flag: what a real run could need.
# NaN and +-inf fail every range; every size of a tuple flag must lie in it. A new numeric field
# needs an entry (tests/test_bad_inputs.py fails otherwise).
RANGES = [
    # seed + num_seeds - 1 stays an int32 (the seeds are a jnp array); env resets add < 10**6
    (0, 2**30, ["seed"]),
    # seeds share one jitted update; one LLM request per rule round, so no need for concurrency
    (1, 64, ["num_seeds", "llm_concurrency"]),
    (0.001, 1.0, ["dataset_fraction"]),
    (1, 10**9, ["total_steps", "log_interval"]),
    (0, 10**9, ["eval_every", "adapt_interval"]),
    # batch x width: 2**16 x 2**14 floats are 4 GB per layer, what one GPU could still hold;
    # OGBench's longest episodes have 4,001 steps (the window)
    (1, 2**16, ["batch_size", "keystate_window", "llm_max_new_tokens"]),
    (1, 2**14, ["hidden_dims", "eval_episodes"]),
    (1, MAX_RULES, ["num_rules"]),
    (0.0, 1.0, ["p_keystate"]),
    (0.5, 0.9999, ["discount"]),
    (0.0, 1000.0, ["alpha"]),
    (1.0, 86400.0, ["llm_timeout"]),
    (0.0, 2.0, ["llm_temperature"]),  # the OpenAI API's range
]


def usage_error(message: str):
    """A usage error ends the run with one line and exit status 2, as argparse (and tyro) do;
    data errors exit 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args: Args):
    """Usage errors as one line (`error: --flag: ...`) before anything heavy; files are checked
    where they are read, the rule compiler keeps its own checks."""
    for low, high, names in RANGES:
        for name in names:
            value = getattr(args, name)
            values = value if isinstance(value, tuple) else [value]
            # `not low <= v <= high` also holds for NaN; None is unset (the per-env default)
            if any(v is not None and not low <= v <= high for v in values):
                usage_error(f"--{name.replace('_', '-')}: must be in [{low}, {high}], got {value}")


def resolve_presets(args: Args) -> Args:
    """Per-env defaults as OGBench's hyperparameters.sh: alpha (GCIQL_ALPHA), discount 0.995 on
    giant / humanoidmaze."""
    env = args.env_name
    if args.alpha is None:  # 0.3: get_config() default
        args.alpha = next((a for key, a in GCIQL_ALPHA.items() if key in env), 0.3)
    if args.discount is None:
        args.discount = 0.995 if "giant" in env or "humanoidmaze" in env else 0.99
    return args


# === Method: key-state rule generation (Section 2.1 (1)) ==========================================
def read_prompt(path: Path) -> str:
    """A prompt file's body: what follows its '---' line (above it: where the prompt comes from,
    its placeholders)."""
    return path.read_text().split("\n---\n", 1)[-1].strip()


def read_layout(args: Args):
    """The layout prompt prompts/keystate/layout_<family>.md whose family starts --env-name, and its
    feature names."""
    families = sorted((PROMPTS / "keystate").glob("layout_*.md"))
    match = [
        p
        for p in families
        if args.env_name.startswith(p.stem.removeprefix("layout_").replace("_", "-") + "-")
    ]
    if not match:
        usage_error(
            f"--env-name: no prompts/keystate/layout_*.md for {args.env_name!r} "
            "(add one, or --relabel her)"
        )
    layout = read_prompt(match[0])
    return layout, {m[1]: int(m[2]) for m in re.finditer(r"^- `(\w+)` = s(\d+)", layout, re.M)}


def extract_rules_json(text: str) -> list:
    """The first {"rules": [...]} object in an LLM answer or a rules file (code fences and chatter
    tolerated)."""
    # Only a "{" with a "rules" key before any other "{" is tried (rules.json starts with
    # "env_name"), at most MAX_RULES of them: a try may scan the rest of the text, so the cost stays
    # linear in its size (a 1 MB file of "{" took minutes when every "{" was tried).
    for m in list(re.finditer(r'\{[^{]*?"rules"\s*:', text))[:MAX_RULES]:
        try:
            obj = json.JSONDecoder().raw_decode(text, m.start())[0]
        except (ValueError, RecursionError):
            continue  # not JSON from here, or nested beyond the parser's limit
        if isinstance(obj.get("rules"), list):
            return obj["rules"]
    raise RuleError("no JSON object with a 'rules' list found")


def generate_rules(
    args: Args, feats: "Features", layout: str, valid_rows: np.ndarray, key_mask: np.ndarray, log
):
    """Section 2.1 (1): ask the LLM for rules, check them, send failures back (MAX_REPAIR_ROUNDS
    repair prompts)."""
    client = LLMClient(args)
    # the layout's "Task: ..." paragraph, then its features
    task, _, layout_features = layout.partition("\nFeatures:")
    fields = dict(
        env_name=args.env_name,
        num_rules=args.num_rules,
        observation_layout=layout_features.strip(),
        task_description=" ".join(task.removeprefix("Task:").split()),
        features=", ".join(feats.columns),
        # what compiles
        functions=", ".join(k for k in OPS if isinstance(k, str)),
        max_lag=MAX_LAG,
        min_fire=f"{RULE_MIN_FIRE:.1%}",
        max_fire=f"{RULE_MAX_FIRE:.1%}",
    )
    prompt = Template(read_prompt(PROMPTS / "keystate" / "rule_generation.md")).substitute(fields)
    accepted = []
    rejected = 0
    for round_ in range(MAX_REPAIR_ROUNDS + 1):
        answer = client.chat([[{"role": "user", "content": prompt}]])[0]
        if answer is None:  # printed and counted by the client; the next round asks again
            continue
        log(f"[rules] LLM round {round_} answered: {answer[:300]!r}")
        try:
            good, failures = check_rules(
                extract_rules_json(answer), feats, valid_rows, key_mask, log
            )
        except RuleError as e:
            good = []
            failures = [dict(name="(whole answer)", condition=answer[:200], error=str(e))]
            log(f"[rules] rejected (whole answer): {e}")
        accepted += [g for g in good if g["condition"] not in {r["condition"] for r in accepted}]
        rejected += len(failures)
        if not failures or len(accepted) >= args.num_rules:
            break
        lines = "\n".join(f"- {f['name']}: {f['condition']!r} -> {f['error']}" for f in failures)
        prompt = Template(read_prompt(PROMPTS / "keystate" / "rule_repair.md")).substitute(
            fields, failures=lines
        )
    return accepted, dict(rejected_rules=rejected, llm_failures=client.failures)


# === Method: rule compilation into discriminators, compile-time self-check (Section 2.1 (2)) ======
# What a rule may use besides features and numbers: operators (by AST node type) and functions (by
# name) -> NumPy on all states at once; /, sqrt, log, exp made total (no NaN or inf).
# prev/next/delta(expr, k): clamped to the episode (`ev`).
OPS = {
    ast.Add: np.add,
    ast.Sub: np.subtract,
    ast.Mult: np.multiply,
    ast.USub: np.negative,
    ast.UAdd: np.positive,
    ast.Div: lambda a, b: a / np.where(b == 0, 1e-8, b),
    ast.Lt: np.less,
    ast.LtE: np.less_equal,
    ast.Gt: np.greater,
    ast.GtE: np.greater_equal,
    ast.Not: np.logical_not,
    ast.Eq: np.equal,
    ast.NotEq: np.not_equal,
    ast.And: np.logical_and,
    ast.Or: np.logical_or,
    **{
        name: getattr(np, name)
        for name in (
            "abs",
            "sin",
            "cos",
            "tanh",
            "sign",
            "arctan2",
            "clip",
        )
    },
    "sqrt": lambda x: np.sqrt(np.abs(x)),
    "log": lambda x: np.log(np.abs(x) + 1e-8),
    "exp": lambda x: np.exp(np.clip(x, -50, 50)),
    "min": np.minimum,
    "max": np.maximum,
    "norm": lambda *xs: np.sqrt(sum(np.square(x) for x in xs)),
    # evaluated in `ev`
    "prev": None,
    "next": None,
    "delta": None,
}
# Positional arguments of each function; the others take 1, norm 1 to 8.
ARITY = {
    "arctan2": 2,
    "min": 2,
    "max": 2,
    "clip": 3,
    "norm": None,
    "prev": 2,
    "next": 2,
    "delta": 2,
}
# Bounds on what a rule may cost to parse and evaluate.
MAX_EXPR_CHARS = 400
MAX_AST_NODES = 120
MAX_POW = 4


class RuleError(ValueError):
    """A rule that fails to parse, to validate or to run; the message goes back to the LLM in
    the repair prompt."""


class Features:
    """What a rule may read (s0 ..., layout names, t / t_left: steps since / until episode end),
    episode bounds."""

    def __init__(self, ds: dict, names: dict):
        obs = ds["observations"]
        idx = np.arange(len(obs))
        ends = np.nonzero(ds["valids"] == 0)[0]
        ep_id = np.searchsorted(ends, idx)
        self.ep_start = np.concatenate([[0], ends[:-1] + 1])[ep_id]
        self.ep_end = ends[ep_id]
        self.columns = {f"s{i}": obs[:, i] for i in range(obs.shape[1])} | {
            k: obs[:, i] for k, i in names.items()
        }
        self.columns["t"] = idx - self.ep_start
        self.columns["t_left"] = self.ep_end - idx


def compile_condition(expr: str, feats: Features) -> np.ndarray:
    """Section 2.1 (2): a condition -> discriminator state -> {0, 1} on all states (NumPy). The
    evaluator is the whitelist (other syntax: RuleError; never executed); each sub-expression is
    computed once: linear cost."""
    if not isinstance(expr, str) or not 0 < len(expr.strip()) <= MAX_EXPR_CHARS:
        raise RuleError(
            f"condition must be a non-empty string of at most {MAX_EXPR_CHARS} characters"
        )
    try:
        tree = ast.parse(expr.strip(), mode="eval").body
    except SyntaxError as e:
        raise RuleError(f"syntax error: {e.msg}") from None
    if sum(1 for _ in ast.walk(tree)) > MAX_AST_NODES:
        raise RuleError(f"condition too complex (more than {MAX_AST_NODES} syntax nodes)")

    def ev(node, lags):
        # `lags`: the sum of the prev/next/delta lags above this node, checked before their
        # argument is evaluated
        op = OPS.get(type(getattr(node, "op", None)))
        fn = (
            node.func.id if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) else None
        )
        # finite real numbers only: no str, bool, None, complex, 1e999, 10**400
        if isinstance(node, ast.Constant):
            if type(node.value) not in (int, float) or not abs(node.value) < 1e300:
                raise RuleError(f"{ast.unparse(node)[:20]!r} is not a finite real number")
            return np.float64(node.value)
        if isinstance(node, ast.Name) and node.id in feats.columns:
            return feats.columns[node.id]
        if isinstance(node, ast.UnaryOp) and op:
            return op(ev(node.operand, lags))
        if isinstance(node, ast.BoolOp):
            values = [np.asarray(ev(v, lags), dtype=bool) for v in node.values]
            return functools.reduce(op, values)
        # |a|^p, odd integer p keeps a's sign
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
            p = ev(node.right, lags)
            if np.ndim(p) or not abs(p) <= MAX_POW:
                raise RuleError(f"exponents must be numbers with |p| <= {MAX_POW}")
            a = ev(node.left, lags)
            sign = np.sign(a) if p == int(p) and int(p) % 2 else 1.0
            return np.power(np.abs(a), p) * sign
        if isinstance(node, ast.BinOp) and op:
            return op(ev(node.left, lags), ev(node.right, lags))
        # a < b <= c: pairwise, and-ed
        if isinstance(node, ast.Compare) and all(type(o) in OPS for o in node.ops):
            vals = [ev(v, lags) for v in [node.left, *node.comparators]]
            return functools.reduce(
                np.logical_and, [OPS[type(o)](a, b) for o, a, b in zip(node.ops, vals, vals[1:])]
            )
        if fn not in OPS:
            raise RuleError(
                "unknown feature, operator or function: "
                f"{ast.unparse(getattr(node, 'func', node))[:40]}"
            )
        arity = ARITY.get(fn, 1)
        args = node.args
        if node.keywords or (len(args) != arity if arity else not 1 <= len(args) <= 8):
            raise RuleError(f"{fn}() takes {arity or '1 to 8'} positional arguments")
        if OPS[fn] is not None:
            return OPS[fn](*[ev(a, lags) for a in args])
        k = args[1].value if isinstance(args[1], ast.Constant) else None
        # bounds the window, and so the nesting depth
        if type(k) is not int or not 1 <= k <= MAX_LAG - lags:
            raise RuleError(
                f"{fn}(): lag must be an integer literal >= 1; "
                f"nested lags may add up to {MAX_LAG} steps"
            )
        # a number: the same at every row
        value = np.broadcast_to(ev(args[0], lags + k), feats.ep_start.shape)
        rows = np.clip(
            np.arange(len(value)) + (k if fn == "next" else -k), feats.ep_start, feats.ep_end
        )
        return value - value[rows] if fn == "delta" else value[rows]

    with np.errstate(all="ignore"):
        out = np.broadcast_to(np.asarray(ev(tree, 0)), feats.ep_start.shape)
    if out.dtype != bool:
        raise RuleError("condition is not a comparison (it must evaluate to true/false per state)")
    return out


def check_rules(
    rules: list, feats: Features, valid_rows: np.ndarray, key_mask: np.ndarray, log=print
):
    """Compile-time self-check of <= MAX_RULES rules: parse, run, fire rate in bounds; masks OR-ed
    into key_mask."""
    if len(rules) > MAX_RULES:  # one cap for LLM answers and rule files
        log(f"[rules] {len(rules) - MAX_RULES} rules beyond the cap of {MAX_RULES} dropped")
    accepted = []
    failures = []
    for i, r in enumerate(rules[:MAX_RULES]):
        if not isinstance(r, dict):  # e.g. a bare condition string: no rule object, rejected
            r = {}
        name = str(r.get("name", f"rule_{i}"))[:64]
        cond = r.get("condition")
        try:
            mask = compile_condition(cond, feats)
            frac = float(mask[valid_rows].mean())
            if not RULE_MIN_FIRE <= frac <= RULE_MAX_FIRE:
                raise RuleError(
                    f"fires on {frac:.2%} of states, "
                    f"outside [{RULE_MIN_FIRE:.2%}, {RULE_MAX_FIRE:.2%}]"
                )
            key_mask |= mask
            desc = str(r.get("description", ""))[:300]
            accepted.append(dict(name=name, description=desc, condition=cond, fire_rate=frac))
        # Anything the validator did not foresee rejects the rule instead of crashing the run.
        except (ArithmeticError, ValueError, TypeError, RecursionError, MemoryError) as e:
            error = (
                str(e)
                if isinstance(e, RuleError)
                else f"could not be evaluated ({type(e).__name__})"
            )
            failures.append(
                dict(
                    name=name,
                    condition=str(cond)[:MAX_EXPR_CHARS],
                    error=error,
                )
            )
            log(f"[rules] rejected {name}: {error}")
    return accepted, failures


def build_keystate_mask(args: Args, ds: dict, kept: np.ndarray, log):
    """Components (1) + (2): rules (--rules-path or LLM) -> one key-state mask (None: HER), and
    rules.json's content."""
    layout, names = read_layout(args)
    feats = Features(ds, names)
    valid = (ds["valids"] > 0) & kept
    # the union of the accepted rules' masks, OR-ed in as they compile
    key_mask = np.zeros(len(valid), bool)
    if args.rules_path:  # a saved rule set: the same self-check, no LLM
        # A file that cannot be read or holds no rules is a data error: one line, exit status 1.
        try:
            text = Path(args.rules_path).read_text()
            rules, failures = check_rules(extract_rules_json(text), feats, valid, key_mask, log)
        except (OSError, RuleError, UnicodeDecodeError) as e:
            raise SystemExit(f"error: {args.rules_path}: {e}") from None
        stats = dict(rejected_rules=len(failures), llm_failures=0)
    else:
        rules, stats = generate_rules(args, feats, layout, valid, key_mask, log)
    out = dict(env_name=args.env_name, rules=rules, **stats)
    log(
        f"[rules] {len(rules)} accepted, {stats['rejected_rules']} rejected, "
        f"{stats['llm_failures']} failed LLM calls"
    )
    if not rules:
        log(
            "[rules] WARNING: no valid rule survived the self-check; falling back to HER relabeling"
        )
        return None, out
    for r in rules:
        log(f"[rules] accepted {r['name']} ({r['fire_rate']:.2%} of states): {r['condition']}")
    log(
        f"[rules] key states: {int((key_mask & valid).sum())} "
        f"({(key_mask & valid).mean():.2%} of kept rows)"
    )
    return key_mask, out


# === Method: key-state-prioritised goal relabeling (Section 2.1 (3)) ==============================
def make_goal_data(
    ds: dict, key_mask: Optional[np.ndarray], keep: Optional[np.ndarray] = None
) -> dict:
    """Device arrays the jitted sampler reads; keep (seeds, N) gives PER_SEED members a seed axis
    (None: all rows)."""
    ep = Features(ds, {})  # only for each row's episode bounds
    valid = ds["valids"] > 0
    key_idxs = np.nonzero(valid & key_mask)[0] if key_mask is not None else []
    rows = [np.nonzero(valid & k)[0] for k in (valid[None] if keep is None else keep)]
    longest = max(map(len, rows))
    padded = np.stack([np.pad(r, (0, longest - len(r)), mode="edge") for r in rows])
    n_valid = np.array([len(r) for r in rows])
    return {
        "observations": jnp.asarray(ds["observations"]),  # (N, ob_dim)
        "actions": jnp.asarray(ds["actions"]),  # (N, act_dim)
        # ([S,] M) rows with a next state
        "valid_idxs": jnp.asarray(padded[0] if keep is None else padded, jnp.int32),
        # ([S,]) how many of them
        "n_valid": jnp.asarray(n_valid[0] if keep is None else n_valid, jnp.int32),
        # (N,) last goal row of each row's episode: its last valid row (OGBench's terminal_locs)
        "final_idxs": jnp.asarray(np.maximum(ep.ep_end - 1, ep.ep_start), jnp.int32),
        # (K + 1,) sorted rows that satisfy a discriminator, then N: a sentinel no window reaches
        "key_idxs": jnp.asarray(np.append(key_idxs, len(valid)), jnp.int32),
    }


def keystate_goals(key, idxs, final, key_idxs, window):
    """Section 2.1 (3): a key state drawn uniformly in (t, min(t + window, final)] -> (rows, whether
    one exists)."""
    lo = jnp.searchsorted(key_idxs, idxs, side="right")  # first key state strictly after t
    hi = jnp.searchsorted(key_idxs, jnp.minimum(idxs + window, final), side="right")
    pick = lo + jnp.floor(jax.random.uniform(key, idxs.shape) * (hi - lo)).astype(jnp.int32)
    return key_idxs[jnp.minimum(pick, key_idxs.shape[0] - 1)], hi > lo


def sample_goals(key, data: dict, idxs, discount, p_key, window, *, p_cur, p_traj, geometric):
    """OGBench's GCDataset.sample_goals, with its goal mix named: the current state w.p. p_cur, a
    future state of the same trajectory w.p. p_traj, else a random state; future offsets geometric
    (value goals) or uniform (actor goals). Section 2.1 (3): a future-state (HER) goal becomes a key
    state w.p. p_key when one is in the window. -> (goals, is key state, is HER goal)."""
    k_rand, k_geom, k_mix, k_cur, k_key, k_use = jax.random.split(key, 6)
    b = idxs.shape[0]
    random_goals = data["valid_idxs"][jax.random.randint(k_rand, (b,), 0, data["n_valid"])]
    final = data["final_idxs"][idxs]
    if geometric:  # offsets in [1, inf) with success prob 1 - discount (value goals)
        offsets = jax.random.geometric(k_geom, 1.0 - discount, (b,)).astype(jnp.int32)
        traj_goals = jnp.minimum(idxs + offsets, final)
    else:  # uniform over (t, final] (actor goals), rounded as in OGBench
        u = jax.random.uniform(k_geom, (b,))
        traj_goals = jnp.round(jnp.minimum(idxs + 1, final) * u + final * (1 - u)).astype(jnp.int32)
    is_traj = jax.random.uniform(k_mix, (b,)) < p_traj / max(1.0 - p_cur, 1e-8)
    key_goals, has_key = keystate_goals(k_key, idxs, final, data["key_idxs"], window)
    is_key = is_traj & has_key & (jax.random.uniform(k_use, (b,)) < p_key)
    # no key state in the window: the HER goal
    goals = jnp.where(is_traj, jnp.where(is_key, key_goals, traj_goals), random_goals)
    is_cur = jax.random.uniform(k_cur, (b,)) < p_cur
    return jnp.where(is_cur, idxs, goals), is_key & ~is_cur, is_traj & ~is_key & ~is_cur


def sample_batch(key, data: dict, args: Args, p_keystate):
    """A GCIQL batch with value / actor goals and -1/0 rewards (OGBench gc_negative=True)."""
    k_idx, k_val, k_act = jax.random.split(key, 3)
    draws = jax.random.randint(k_idx, (args.batch_size,), 0, data["n_valid"])
    idxs = data["valid_idxs"][draws]
    window = args.keystate_window
    obs = data["observations"]
    # Value goals: OGBench's mix of 0.2 current state, 0.5 future state (geometric), 0.3 random
    # state; the future states become key states w.p. p_keystate (Section 2.1 (3)).
    value_goals, is_key, _ = sample_goals(
        k_val,
        data,
        idxs,
        args.discount,
        p_keystate,
        window,
        p_cur=0.2,
        p_traj=0.5,
        geometric=True,
    )
    # Actor goals stay OGBench's (uniform future; random w.p. actor_p_randomgoal): the paper changes
    # only the value goals' relabeling (Section 2.1 (4)), and a key state within the window would
    # also shorten the actor's horizon. No future goals on explore data, half on stitch data.
    p_traj = 1.0
    if "explore" in args.env_name:
        p_traj = 0.0
    elif "stitch" in args.env_name:
        p_traj = 0.5
    actor_goals, _, _ = sample_goals(
        k_act, data, idxs, args.discount, 0.0, window, p_cur=0.0, p_traj=p_traj, geometric=False
    )
    successes = (idxs == value_goals).astype(jnp.float32)
    # compact layout: valid rows have a next row
    return dict(
        observations=obs[idxs],
        next_observations=obs[idxs + 1],
        actions=data["actions"][idxs],
        value_goals=obs[value_goals],
        actor_goals=obs[actor_goals],
        value_goal_is_key=is_key,
        rewards=successes - 1.0,
        masks=1.0 - successes,
    )


# === Method: relabel-time self-check, the paired TD probe (Section 2.1, Figure 2) =================
def probe_batch(key, data: dict, args: Args):
    """Paired TD probe (Figure 2): fresh rows, each with four goals in one window (t, t+W]: a key
    state, the non-key state nearest to it (the distance-matched comparator), a HER goal and a
    uniform goal."""
    k_idx, k_key, k_her, k_uni = jax.random.split(key, 4)
    draws = jax.random.randint(k_idx, (args.batch_size,), 0, data["n_valid"])
    idxs = data["valid_idxs"][draws]
    final = data["final_idxs"][idxs]
    obs = data["observations"]
    key_idxs = data["key_idxs"]
    key_goals, has_key = keystate_goals(k_key, idxs, final, key_idxs, args.keystate_window)
    end = jnp.minimum(idxs + args.keystate_window, final)
    # Matched: the rows at key offset k -+ 1, k -+ 2, ... in this order; the first one in the window
    # that is no key state. Key-state - matched compares goals at (nearly) the same distance, so the
    # gap measures key states, not distance (HER goals are nearer on average, uniform ones not).
    near = np.arange(1, args.keystate_window + 1)
    near = key_goals[:, None] + np.stack([-near, near], 1).reshape(-1)  # (B, 2W)
    in_window = (near > idxs[:, None]) & (near <= end[:, None])
    ok = in_window & (key_idxs[jnp.searchsorted(key_idxs, near)] != near)
    matched = jnp.take_along_axis(near, jnp.argmax(ok, 1)[:, None], 1)[:, 0]
    # HER goal: OGBench's geometric offset, conditioned on the window (inverse CDF of P(k)
    # proportional to discount^(k - 1) on k = 1 ... |W|)
    u = jax.random.uniform(k_her, idxs.shape)
    her = jnp.log1p(-u * (1 - args.discount ** (end - idxs))) / jnp.log(args.discount)
    goals = jnp.stack(
        [
            key_goals,  # key-state goal (the paper's relabeling)
            matched,  # the nearest non-key state to it in the window
            jnp.clip(idxs + jnp.ceil(her).astype(jnp.int32), idxs + 1, end),  # HER goal
            jax.random.randint(k_uni, idxs.shape, idxs + 1, end + 1),  # uniform over the window
        ]
    )
    ones = jnp.ones(idxs.shape)  # every goal lies strictly after t: reward -1, mask 1
    batch = dict(
        observations=obs[idxs],
        next_observations=obs[idxs + 1],
        actions=data["actions"][idxs],
        rewards=-ones,
        masks=ones,
    )
    # rows that count: a key state and a non-key state in the window
    return batch, obs[goals], goals - idxs, has_key & ok.any(1)


class RelabelCheck:
    """Relabel-time self-check (Section 2.1, Theorem 2.1's premise; our rule, why:
    docs/keystate_gciql.md). Paired d = |TD_key| - |TD_matched| on the same rows; if |z| > ADAPT_Z,
    a seed's k-th move of p_keystate is ADAPT_STEP * ADAPT_K0 / (ADAPT_K0 + k): the steps vanish, so
    p converges instead of cycling on its own effect."""

    def __init__(self, args: Args, probing: bool):
        self.p_keystate = np.full(
            args.num_seeds, args.p_keystate if args.relabel == "keystate" else 0.0
        )
        self.interval = args.adapt_interval if probing and args.relabel == "keystate" else 0
        # No decision in the first tenth of training: a barely trained critic's TD errors reflect
        # its initialisation more than the goals (the largest moves fell at steps 100-600 before).
        self.warmup = args.total_steps // 10
        self.probing = probing
        self.moves = np.zeros(args.num_seeds)  # per seed: decisions that moved p
        self.snapshots = []
        self.eval_every = args.eval_every

    def adapt(self, diffs: np.ndarray, counts: np.ndarray):
        """diffs: (S, B) paired differences, counts: (S, B) rows that count -> (mean, z) per
        seed."""
        n = counts.sum(1)
        mean = (diffs * counts).sum(1) / np.maximum(n, 1)
        var = ((diffs - mean[:, None]) ** 2 * counts).sum(1) / np.maximum(n - 1, 1)
        # constant input: a huge |z|, a decided sign
        z = mean / np.sqrt(var / np.maximum(n, 1) + 1e-12)
        move = np.sign(z) * (np.abs(z) > ADAPT_Z) * (n >= 2)
        self.p_keystate = np.clip(
            self.p_keystate + move * ADAPT_STEP * ADAPT_K0 / (ADAPT_K0 + self.moves),
            P_KEYSTATE_MIN,
            P_KEYSTATE_MAX,
        )
        # only decisions that move p shrink the step: a run of undecided probes keeps it
        self.moves += move != 0
        return mean, z

    def observe(self, step: int, last: bool, probe, writer):
        """probe() -> |TD| (S, 4, B) of key-state / matched / HER / uniform goals, goal distances
        (S, 4, B), counts (S, B)."""
        adapt = self.interval and step % self.interval == 0 and step > self.warmup
        keep = (self.eval_every and step % self.eval_every == 0) or last
        if self.probing and (adapt or keep):
            td, dist, counts = map(np.asarray, probe())
            if adapt:
                mean, _ = self.adapt(td[:, 0] - td[:, 1], counts)
                writer.add_scalar("relabel/td_gap_key_minus_matched", mean.mean(), step)
            if keep:
                self.snapshots.append((step, td, dist, counts))

    def save(self, run_dir: Path):
        """Figure 2 -> td_probe.npz, .png: per snapshot and seed, the mean paired |TD| gap key-state
        - matched / HER / uniform over the rows that count (NaN: none). The figure draws the matched
        gap, one line per seed: the spread across seeds is its uncertainty (pooling rows of several
        seeds into one interval would hide it); docs/results/report.py adds 95% CIs clustered by
        seed."""
        # (T,), (T, S, 4, B), (T, S, 4, B), (T, S, B)
        steps, td, dist, counts = (np.stack(x) for x in zip(*self.snapshots))
        kinds = ["keystate", "matched", "her", "uniform"]
        out = dict(steps=steps, td=td, dist=dist, counts=counts, kinds=kinds)
        for i in 1, 2, 3:
            gap = (td[:, :, 0] - td[:, :, i]) * counts
            with np.errstate(invalid="ignore"):  # 0 / 0: no row counts
                out[f"gap_{kinds[i]}"] = gap.sum(-1) / counts.sum(-1)
        np.savez(run_dir / "td_probe.npz", **out)
        plt.plot(steps, out["gap_matched"], marker="o")  # (T, S): a line per seed
        plt.axhline(0, color="gray")  # the finding is the sign of the gap
        # the run folder's name (env, experiment, arm, data fraction, seeds) says which run it is
        plt.gca().set(
            xlabel="gradient step",
            ylabel="key-state - matched |TD| gap per seed\n(> 0: key-state goals are harder)",
        )
        plt.savefig(run_dir / "td_probe.png", bbox_inches="tight")  # the long y label fits
        plt.close()


# === Learner: GCIQL (Section 2.1 (4); OGBench impls/agents/gciql.py) ==============================
class MLP(nn.Module):
    """OGBench's MLP (Dense -> GELU -> LayerNorm, variance-scaling init; final_scale:
    final_fc_init_scale) on inputs."""

    hidden_dims: Tuple[int, ...]
    layer_norm: bool = False
    final_scale: float = 1.0

    @nn.compact
    def __call__(self, *inputs):
        x = jnp.concatenate(inputs, axis=-1)
        for i, size in enumerate(self.hidden_dims):
            last = i + 1 == len(self.hidden_dims)
            init = nn.initializers.variance_scaling(
                self.final_scale if last else 1.0, "fan_avg", "uniform"
            )
            x = nn.Dense(size, kernel_init=init)(x)
            if not last:
                x = nn.LayerNorm()(nn.gelu(x)) if self.layer_norm else nn.gelu(x)
        return x


class GCValue(nn.Module):
    """V(s, g), or vmapped heads (GCIQL's Q1,2(s, g, a), HIQL's V1,2(s, phi)); LayerNorm on, as
    OGBench's values."""

    hidden_dims: Tuple[int, ...]
    ensemble: int = 1

    @nn.compact
    def __call__(self, *inputs):  # observations, goals[, actions]
        vmap = dict(
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=None,
            axis_size=self.ensemble,
        )
        mlp = nn.vmap(MLP, **vmap) if self.ensemble > 1 else MLP
        return mlp((*self.hidden_dims, 1), layer_norm=True)(*inputs).squeeze(-1)


class AgentState(NamedTuple):
    # the optimised parameters of every module, under one Adam (as OGBench's TrainState)
    params: dict
    # soft target copy of the bootstrapping network (GCIQL: the critic; HIQL: the value heads)
    target: Any
    opt_state: Any
    rng: jax.Array


def make_agent(args: Args, ob_dim: int, act_dim: int, key):
    """GCIQL's networks V(s, g), Q1,2(s, g, a), pi(a | s, g) under one Adam, and the critic's target
    copy (key None: the state is None)."""
    hd = tuple(args.hidden_dims)
    nets = dict(
        value=GCValue(hd),
        critic=GCValue(hd, ensemble=2),
        # the mean of pi(a | s, g), constant std 1, no LayerNorm (OGBench's const_std defaults)
        actor=MLP((*hd, act_dim), final_scale=1e-2),
    )
    ob = jnp.zeros((1, ob_dim))
    act = jnp.zeros((1, act_dim))
    # example inputs that fix the shapes
    inputs = dict(
        value=(ob, ob),
        critic=(ob, ob, act),
        actor=(ob, ob),
    )
    tx = optax.adam(LR)
    if key is None:  # the modules and the optimiser only: no parameters allocated
        return nets, tx, None
    key, *keys = jax.random.split(key, 4)
    params = {}
    for name, k in zip(nets, keys):
        params[name] = nets[name].init(k, *inputs[name])["params"]
    target = tree_map(jnp.copy, params["critic"])  # starts equal, own buffers (donation)
    return nets, tx, AgentState(params, target, tx.init(params), key)


def expectile_loss(adv, diff, expectile):
    """IQL's expectile regression |tau - 1(adv < 0)| * diff^2 (Kostrikov et al., arXiv 2110.06169).
    GCIQL: adv = diff = Q - V; HIQL: adv is the target heads' advantage, diff each head's error."""
    return jnp.where(adv >= 0, expectile, 1 - expectile) * diff**2


def value_loss(params, target_critic, batch, nets: dict, expectile):
    """V(s, g) regresses to the expectile of min(Q1, Q2)_target(s, g, a) (IQL, Kostrikov et al.,
    arXiv 2110.06169)."""
    obs = batch["observations"]
    goals = batch["value_goals"]
    q = jnp.minimum(*nets["critic"].apply({"params": target_critic}, obs, goals, batch["actions"]))
    v = nets["value"].apply({"params": params["value"]}, obs, goals)  # (batch,)
    # GCIQL weighs V's error by its own sign: |tau - 1(q < v)| * (q - v)^2
    loss = expectile_loss(q - v, q - v, expectile).mean()
    return loss, {"value/value_loss": loss, "value/v_mean": v.mean()}


def critic_loss(params, batch, nets: dict, discount):
    """Q1,2(s, g, a) regress to r + discount * mask * V(s', g); also the |TD| the relabel-time
    self-check reads."""
    obs = batch["observations"]
    goals = batch["value_goals"]
    next_v = nets["value"].apply(
        {"params": jax.lax.stop_gradient(params["value"])}, batch["next_observations"], goals
    )
    target = batch["rewards"] + discount * batch["masks"] * next_v  # (batch,)
    q1, q2 = nets["critic"].apply({"params": params["critic"]}, obs, goals, batch["actions"])
    loss = ((q1 - target) ** 2 + (q2 - target) ** 2).mean()
    td_abs = jax.lax.stop_gradient(jnp.abs(target - 0.5 * (q1 + q2)))  # (batch,)
    return loss, {
        "critic/critic_loss": loss,
        "critic/q_mean": target.mean(),
        "td_abs": td_abs,
    }


def actor_loss(params, batch, nets: dict, alpha):
    """DDPG+BC, OGBench's GCIQL actor: -Q(s, g, pi(s, g)) / |Q|.mean() - alpha * log
    pi(a | s, g)."""
    obs = batch["observations"]
    goals = batch["actor_goals"]
    mean = nets["actor"].apply({"params": params["actor"]}, obs, goals)  # (batch, act_dim)
    # the actor loss trains the actor only; constant std: Q of the mean action
    critic = {"params": jax.lax.stop_gradient(params["critic"])}
    q = jnp.minimum(*nets["critic"].apply(critic, obs, goals, jnp.clip(mean, -1, 1)))
    q_loss = -q.mean() / jax.lax.stop_gradient(jnp.abs(q).mean() + 1e-6)  # scale-invariant Q term
    # log N(a; mean, I): (batch,)
    squared_error = (batch["actions"] - mean) ** 2
    log_prob = jnp.sum(-0.5 * squared_error - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
    bc_loss = -(alpha * log_prob).mean()
    return q_loss + bc_loss, {
        "actor/actor_loss": q_loss + bc_loss,
        "actor/q_loss": q_loss,
        "actor/bc_loss": bc_loss,
    }


def over_seeds(fn):
    """fn(state, data, *args) on all seeds (leading axis) in one call: vmap on GPU/TPU, lax.map on
    CPU (see `call`)."""

    def call(state, data, *rest):
        def one_seed(x):  # x: one seed's (state, PER_SEED data, *rest)
            return fn(x[0], data | x[1], *x[2:])

        xs = (state, {k: data[k] for k in PER_SEED}, *rest)
        # XLA:CPU runs vmap's batched matmuls 3.5x slower per seed than this loop (measured:
        # docs/keystate_gciql.md)
        if jax.default_backend() == "cpu":
            return jax.lax.map(one_seed, xs)
        return jax.vmap(one_seed)(xs)

    return call


def make_update(args: Args, nets: dict, tx, chunk: int = 1):
    """Jitted train steps for all seeds, `chunk` per call (each: relabeled batch on device, one Adam
    step, soft target update) -> (state, each step's info), and the probe."""

    def total_loss(params, target_critic, batch):
        v_loss, v_info = value_loss(params, target_critic, batch, nets, EXPECTILE)
        c_loss, c_info = critic_loss(params, batch, nets, args.discount)
        a_loss, a_info = actor_loss(params, batch, nets, args.alpha)
        return v_loss + c_loss + a_loss, {**v_info, **c_info, **a_info}

    def update(state: AgentState, data: dict, p_keystate):
        rng, k_batch = jax.random.split(state.rng)
        batch = sample_batch(k_batch, data, args, p_keystate)
        grads, info = jax.grad(total_loss, has_aux=True)(state.params, state.target, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        # OGBench blends the critic parameters from *before* this step into the target (gciql.py
        # target_update).
        target = tree_map(
            lambda p, tp: TAU * p + (1 - TAU) * tp, state.params["critic"], state.target
        )
        info["relabel/frac_keystate_goals"] = batch["value_goal_is_key"].mean()
        del info["td_abs"]
        return AgentState(params, target, opt_state, rng), info

    def probe(state: AgentState, data: dict):
        batch, goals, dist, counts = probe_batch(jax.random.fold_in(state.rng, 1), data, args)
        td = jax.vmap(
            lambda g: critic_loss(state.params, batch | {"value_goals": g}, nets, args.discount)[1][
                "td_abs"
            ]
        )
        return td(goals), dist, counts

    def steps(state: AgentState, data: dict, p_keystate):
        # A seed's `chunk` steps run before the next seed's: its parameters stay in the CPU cache
        # (seeds interleaved step by step ran 0.69x as fast as one seed per process:
        # tests/benchmarks/bench_keystate_seeds.py).
        return jax.lax.scan(lambda s, _: update(s, data, p_keystate), state, length=chunk)

    # the agents' state is donated: updated in place
    return jax.jit(over_seeds(steps), donate_argnums=(0,)), jax.jit(over_seeds(probe))


def check_memory(jitted, *inputs):
    """jitted compiled for inputs (shapes suffice). Ends the run with one line when XLA's memory
    plan for it exceeds the device's memory (RAM on CPU): flags whose product cannot fit (seeds
    x batch x widths, batch x window) stop before anything is allocated, not in an out-of-memory
    error or the kernel's OOM killer mid-run. The check is ours (the paper and OGBench have
    none)."""
    compiled = jitted.lower(*inputs).compile()
    plan = compiled.memory_analysis()
    # a lower bound: the update's outputs are the donated state (updated in place), the probe's
    # are small
    need = plan.argument_size_in_bytes + plan.temp_size_in_bytes
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # none on CPU
    limit = limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > limit:
        usage_error(
            "--num-seeds x --batch-size x --hidden-dims, --keystate-window: a step needs "
            f"{need / 2**30:.1f} GiB, this machine has {limit / 2**30:.1f} GiB"
        )
    return compiled


def make_policy(nets: dict):
    """Deterministic evaluation action: the Gaussian mean (OGBench eval_temperature=0), clipped
    to [-1, 1]."""
    return jax.jit(
        lambda p, o, g: jnp.clip(
            nets["actor"].apply({"params": p["actor"]}, o[None], g[None])[0], -1, 1
        )
    )


# === Environment and data =========================================================================
def make_env_and_dataset(args: Args):
    """OGBench's environment and training dataset (compact layout: row i+1 is row i's next state
    where valids[i])."""
    import ogbench

    try:
        env = ogbench.make_env_and_datasets(args.env_name, env_only=True)
    except Exception as e:  # gymnasium raises several error types for unknown / malformed names
        usage_error(
            f"--env-name: unknown OGBench environment {args.env_name!r} ({type(e).__name__})"
        )
    source = (
        args.dataset_path
        or f"the official dataset {args.env_name!r} (or pass --dataset-path for a local .npz)"
    )
    # Every failure below is a data error, `error: <file>: <what is wrong>` and exit status 1: not a
    # .npz, a corrupt or object-dtype member, keys missing, download failed.
    try:
        if args.dataset_path:
            ds = ogbench.load_dataset(args.dataset_path, compact_dataset=True)
        else:
            ds = ogbench.make_env_and_datasets(
                args.env_name,
                compact_dataset=True,
                dataset_only=True,
                cur_env=env,
            )[0]
    except Exception as e:
        # one line, whatever the library wrote
        why = f"{type(e).__name__}: {' '.join(str(e).split())}"
        raise SystemExit(
            f"error: {source}: cannot read observations, actions and terminals from it ({why})"
        ) from None
    obs = ds["observations"]
    act = ds["actions"]
    valids = ds["valids"]
    n = obs.shape[:1]
    shapes = (obs.shape, act.shape, valids.shape)
    want = ((*n, *env.observation_space.shape), (*n, *env.action_space.shape), n)
    # what is wrong -> whether it is (OGBench's layout: terminals = 1 on each episode's last row)
    problems = {
        (
            f"observations, actions, terminals have shapes {shapes}; {args.env_name} needs {want}"
        ): shapes != want,
        "observations, actions or terminals hold NaN or inf": not all(
            np.isfinite(x).all() for x in (obs, act, valids)
        ),
        "the last row is not terminal (each episode ends with terminals = 1)": valids[-1:].any(),
        "every row is terminal: no transition to learn from": not valids.any(),
    }
    if any(problems.values()):
        raise SystemExit(
            f"error: {source}: {next(what for what, wrong in problems.items() if wrong)}"
        )
    return env, ds


def episode_subsets(ds: dict, args: Args) -> np.ndarray:
    """Reduced-data setting (Section 3): per seed, a --dataset-fraction of whole episodes, the same
    in both arms."""
    ep_id = np.cumsum(ds["valids"] == 0) - (ds["valids"] == 0)  # episode number of each row
    n_ep = int(ep_id[-1]) + 1
    n_keep = max(1, int(round(args.dataset_fraction * n_ep)))
    seeds = range(args.seed, args.seed + args.num_seeds)
    masks = []
    for s in seeds:
        episodes = np.random.default_rng(s).permutation(n_ep)[:n_keep]
        masks.append(np.isin(ep_id, episodes))
    return np.stack(masks)


# === Evaluation, logging and checkpoints ==========================================================
def evaluate(env, act, params, args: Args, seed: int) -> dict:
    """OGBench protocol (5 tasks, success rate per task and overall): --eval-episodes per task
    (env.reset(options=dict(task_id=i))); success = info['success'] at the end."""
    results = {}
    for task_id, task in enumerate(env.unwrapped.task_infos, start=1):
        successes = []
        # a bar per task: at the paper's 50 episodes an evaluation takes minutes
        for ep in tqdm(range(args.eval_episodes), f"eval seed {seed} task {task_id}", leave=False):
            obs, info = env.reset(seed=seed + 1000 * task_id + ep, options=dict(task_id=task_id))
            goal = info["goal"]
            done = False
            while not done:
                obs, _, terminated, truncated, info = env.step(np.asarray(act(params, obs, goal)))
                done = terminated or truncated
            successes.append(float(info["success"]))
        results[f"eval/{task['task_name']}_success"] = float(np.mean(successes))
    results["eval/overall_success"] = float(np.mean(list(results.values())))
    return results


def evaluate_seeds(env, act, params, args: Args, seeds, step, writer):
    """Evaluate each seed's agent; log the mean over seeds and every seed's results -> (the means,
    the per-seed results). Intervals come from the per-seed results (docs/results/report.py: Wilson
    on the pooled episodes; a Student-t interval over few seeds says little)."""
    per_seed = []
    for i, seed in enumerate(seeds):
        seed_params = tree_map(lambda x: x[i], params)  # the leading axis holds the seeds
        per_seed.append(evaluate(env, act, seed_params, args, seed))
    means = {k: float(np.mean([r[k] for r in per_seed])) for k in per_seed[0]}
    for k, v in (
        means | {f"{k}/seed{s}": r[k] for s, r in zip(seeds, per_seed) for k in r}
    ).items():
        writer.add_scalar(k, v, step)
    text = " ".join(f"{k.removeprefix('eval/')}={m:.3f}" for k, m in means.items())
    tqdm.write(f"eval step={step} {text} per_seed={[r['eval/overall_success'] for r in per_seed]}")
    return means, per_seed


def make_run_dir(args: Args) -> Path:
    """{run_dir}/{env}__{exp}__{arm}__frac{f}__seed{s}x{n}__{time}_{random}, created exclusively
    (mkdtemp)."""
    name = f"{args.env_name}__{args.exp_name}__{args.relabel}__frac{args.dataset_fraction:g}"
    name += f"__seed{args.seed}x{args.num_seeds}__{time.strftime('%Y%m%d-%H%M%S')}_"
    try:
        Path(args.run_dir).mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=name, dir=args.run_dir))
    except OSError as e:  # a file, a read-only place, /proc/...
        raise SystemExit(f"error: --run-dir: cannot create the run folder ({e})")


def start_logging(args: Args, run_dir: Path):
    """TensorBoard in the run folder always, mirrored to W&B with --track; the hyperparameters as a
    table."""
    # imported here: a run that stops at its checks skips torch's import
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir))
    if args.track:
        import wandb

        # entity: $WANDB_ENTITY
        wandb.init(
            project=args.wandb_project_name,
            name=run_dir.name,
            config=vars(args),
            sync_tensorboard=True,
            save_code=True,
        )
    table = "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)
    return writer


def log_losses(writer, step, sps, info, p_keystate, seeds):
    """Losses (the mean over seeds and over the last call's chunk of steps), each seed's p_keystate
    and steps per second: TensorBoard and a line."""
    info = {
        k if k.startswith("relabel/") else f"losses/{k}": float(v.mean()) for k, v in info.items()
    }
    # before any parameters are saved (the data and flags are checked, so this is a divergence)
    if not np.isfinite(list(info.values())).all():
        raise SystemExit(f"error: step {step}: a loss is not finite: {info}")
    p_key = {f"relabel/p_keystate/seed{s}": p for s, p in zip(seeds, p_keystate)}
    for k, v in {**info, **p_key, "charts/SPS": sps}.items():
        writer.add_scalar(k, v, step)
    # value/value_loss=...
    text = " ".join(f"{k.split('/', 1)[1]}={v:.4f}" for k, v in info.items())
    tqdm.write(
        f"step={step} SPS={sps:.1f} {text} p_keystate=" + ",".join(f"{p:.3f}" for p in p_keystate)
    )


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
def main(args: Args):
    check_args(args)
    args = resolve_presets(args)
    seeds = list(range(args.seed, args.seed + args.num_seeds))
    log = tqdm.write
    env, ds = make_env_and_dataset(args)
    keep = episode_subsets(ds, args)
    log(f"[data] {args.env_name}: {len(ds['valids'])} rows; kept per seed: {keep.sum(1).tolist()}")
    # the plan; the step bar's ETA leaves the evaluations (a bar each) out
    log(
        f"[plan] {args.total_steps} steps x {len(seeds)} seed(s); evaluation every "
        f"{args.eval_every} steps (0: none) and at the end"
    )

    # Components (1) + (2): LLM rules -> discriminators -> one key-state mask. The HER arm compiles
    # a --rules-path too, only for the paired TD probe (Figure 2 on an HER-trained critic); no LLM.
    key_mask = None
    rules = None
    if args.relabel == "keystate" or args.rules_path:
        key_mask, rules = build_keystate_mask(args, ds, keep.any(0), log)
    # Component (3) runs inside the jitted update (goal data on device; p from the self-check)
    data = make_goal_data(ds, key_mask, keep)
    check = RelabelCheck(args, key_mask is not None)
    ob_dim = ds["observations"].shape[1]
    act_dim = ds["actions"].shape[1]
    nets, tx, _ = make_agent(args, ob_dim, act_dim, None)

    # One agent per seed, stacked on a leading axis: parameters, Adam moments, target copy, RNG key.
    @jax.vmap
    def init(seed):
        return make_agent(args, ob_dim, act_dim, jax.random.PRNGKey(seed))[2]

    # steps per jitted call: a divisor of 100 and of every interval, so that logs, probes and
    # evaluations fall between calls
    chunk = math.gcd(100, args.total_steps, args.log_interval, args.eval_every, args.adapt_interval)
    update, probe = make_update(args, nets, tx, chunk)
    # compiled for the agents' shapes before any of them is allocated
    shapes = jax.eval_shape(init, jnp.asarray(seeds))
    update = check_memory(update, shapes, data, check.p_keystate)
    if check.probing:  # the paired TD probe runs only with a key-state mask
        probe = check_memory(probe, shapes, data)
    # only now: a run that fails before training leaves no folder behind
    run_dir = make_run_dir(args)
    if rules is not None:
        (run_dir / "rules.json").write_text(json.dumps(rules, indent=2))
    writer = start_logging(args, run_dir)
    state = init(jnp.asarray(seeds))
    act = make_policy(nets)

    # Component (4): offline training; only the relabeling differs from the learner's reference
    # implementation.
    start = last_t = time.time()
    last_step = 0
    for step in tqdm(range(chunk, args.total_steps + 1, chunk)):
        state, info = update(state, data, check.p_keystate)
        last = step == args.total_steps
        check.observe(step, last, lambda: probe(state, data), writer)
        if step % args.log_interval == 0 or last:
            sps = (step - last_step) / (time.time() - last_t)
            last_t = time.time()
            last_step = step
            log_losses(writer, step, sps, info, check.p_keystate, seeds)
        if (args.eval_every and step % args.eval_every == 0) or last:
            scalars, per_seed = evaluate_seeds(env, act, state.params, args, seeds, step, writer)
            last_t = time.time()  # keep evaluation time out of the next SPS reading
    total_time = time.time() - start

    if check.snapshots:
        check.save(run_dir)
    # leading axis: seeds
    (run_dir / "params.msgpack").write_bytes(serialization.to_bytes(state.params))
    (run_dir / "final_eval.json").write_text(
        json.dumps(scalars | dict(seeds=seeds, per_seed=per_seed), indent=2)
    )
    log(
        f"done: {args.total_steps} gradient steps ({len(seeds)} seeds) in {total_time:.1f}s; "
        f"saved to {run_dir}"
    )
    writer.close()
    env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
