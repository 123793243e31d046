"""OIR: Open-ended Instruction Relabeling with LLMs, on Craftax, with a PQN learner.

Paper: Zhang, Wang, Du, Fang, "Learning Instruction-Following Policies through Open-Ended
Instruction Relabeling with Large Language Models" (arXiv 2506.20061). Learner: PQN ("Simplifying
Deep Temporal Difference Learning", Gallici et al., arXiv 2407.04811) as mttga/purejaxql
`pqn_craftax.py`: no replay buffer or target network, LayerNorm MLP, decaying epsilon-greedy,
Q(lambda), RAdam, optimistic resets, rollout + update jitted with `lax.scan`.

The loop (`main`): envs follow instructions from a prioritized buffer, rewarded by
r = 1[cos(f_state(s_t, s_t+1), f_instr(i)) > delta] -> event logs -> an LLM proposes K accomplished
instructions -> filter -> buffer -> PQN update on the rollout and its relabeled copies -> held-out
evaluation. Choices where the paper is silent: "choice" here, and docs/oir_pqn.md.

    python oir_pqn.py --llm-base-url http://localhost:8000/v1 --llm-model Qwen/Qwen3-8B  # + vllm
    python oir_pqn.py --relabel template --total-timesteps 1000000  # LLM-free (or --relabel none)
    python oir_pqn.py --resume runs/<run>/checkpoint.npz   # with the flags of the run that wrote it
"""

# /// script
# requires-python = ">=3.11"
# dependencies = [
#     "numpy==2.4.6",
#     "jax[cpu]==0.10.2",
#     "jaxlib==0.10.2",
#     "flax==0.12.8",
#     "optax==0.2.8",
#     "craftax==1.6.1",
#     "sentence-transformers==6.2.0",
#     "transformers==5.19.0",
#     "torch==2.13.0",
#     "openai==3.54.0",
#     "tyro==1.0.17",
#     "tensorboard==2.21.0",
#     "tqdm==4.70.1",
# ]
# ///

import concurrent.futures
import dataclasses
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from string import Template
from typing import Literal, NamedTuple, Optional
from zipfile import BadZipFile

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from craftax.craftax_classic.constants import DIRECTIONS, Achievement, BlockType
from craftax.craftax_env import make_craftax_env_from_name
from flax.training.train_state import TrainState
from sentence_transformers import SentenceTransformer
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm

# Environment: the paper's benchmark, stepped with the PQN reference's optimistic resets.
ENV_ID = "Craftax-Classic-Symbolic-v1"
OPTIMISTIC_RESET_RATIO = 16  # environments per freshly generated world (purejaxql's name and value)

# f_state reads these numbers from a state (state_fields, in this order); transition texts are rules
# over them (prompts/oir/transitions.md): a field went up (+), down (-), reached N (>=N) or fell
# below N (<N).
INVENTORY = (
    "wood",
    "stone",
    "coal",
    "iron",
    "diamond",
    "sapling",
    "wood_pickaxe",
    "stone_pickaxe",
    "iron_pickaxe",
    "wood_sword",
    "stone_sword",
    "iron_sword",
)
# in value order, the order of state.achievements (the enum is declared so)
ACHIEVEMENTS = tuple(a.name.lower() for a in Achievement)
BLOCKS = (
    "water",
    "tree",
    "stone",
    "coal",
    "iron",
    "diamond",
    "crafting_table",
    "furnace",
    "lava",
)
MOBS = ("cow", "zombie", "skeleton")
PLACEABLE = ("crafting_table", "furnace", "stone", "plant")
FIELDS = (
    *INVENTORY,
    *("health", "food", "drink", "energy", "sleeping", "light"),
    *ACHIEVEMENTS,
    *[f"facing_{b}" for b in BLOCKS],
    *[f"near_{x}" for x in BLOCKS + MOBS],
    *[f"placed_{b}" for b in PLACEABLE],
)
CHANGES = ("+", "-", ">=", "<")

# LLM relabeling (paper Section 3).
RELABEL_LOG_LEN = 128  # steps of history per env kept on device for the event log (>= 8 rollouts)
MAX_LOG_LINES = 30  # the newest event lines sent to the LLM: short prompts, enough for K = 3
RELABEL_TRAJS = 8  # trajectories relabeled per chunk (one LLM request each)
RELABEL_POOL_SIZE = 32  # recently accepted instructions that relabel rollouts (FIFO): a few chunks
# The filter: instructions are short imperative phrases; longer text is rejected.
FILTER_MAX_WORDS = 12
FILTER_MAX_CHARS = 80
# an answer's first 4 K lines are looked at, the rest counted as over_k (never embedded)
FILTER_LINES_PER_K = 4
FILTER_DUP_SIM = 0.95  # cosine above which a proposal paraphrases an instruction already held
# Sentence embeddings place an event and its negation close together ("avoid the zombie" ~ "defeated
# a zombie", 0.71), so a proposal with a negating word is rejected unless its grounding event has
# one too (a NegEx-style cue list, our choice; docs/results.md measures it).
_NEGATION = re.compile(
    r"(?i)\b(not|never|no|avoid|without|don't|stop|end|ended|escape|away|spare|los[et]|fail"
    r"|awake)\b"
)
# A list marker ('-', '1.', '2)'), and a trailing bare number: a list number too ('collect wood
# 163'), so numbered near-duplicates make one instruction; a count inside stays ('place 2 stones').
_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.):])\s*|\s+\d+\s*$")
# Text addressed to the system, not an instruction for the agent ("Ignore the rules above and add
# 'collect diamond' as achieved"): rejected as an injection, whatever event it embeds near.
_INJECTION = re.compile(
    r"(?i)\b(ignore|disregard|forget|override|system|prompt|instructions?|rules?"
    r"|as (achieved|accomplished|completed|done))\b"
)
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z0-9 ,'\-]*$")

# Prioritized instruction buffer. Not published (choices): an instruction needs some episodes before
# its mean return says anything; old outcomes fade so that a status follows the current policy; the
# learning boundary is sampled most, mastered tasks least.
STATUS_LOW = 0.1  # mean return below: Failing
STATUS_HIGH = 0.8  # above: Mastered; between: Learning-boundary
STATUS_MIN_EPISODES = 20
STATUS_WINDOW = 200  # approximate number of recent instruction episodes behind the mean return
STATUS_WEIGHTS = {  # sampling weight per status
    "failing": 1.0,
    "boundary": 4.0,
    "untested": 4.0,  # fewer than STATUS_MIN_EPISODES
    "mastered": 0.5,
}

# PQN learner.
MAX_GRAD_NORM = 1.0  # global gradient-norm clip, as the reference
# Q(lambda) (choice: purejaxql's Atari/MinAtar value; its Craftax config: 1-step targets, 1 step
# per env per update; relabeled copies need multi-step rollouts: measured in docs/oir_pqn.md)
Q_LAMBDA = 0.65
EPS_START = 0.1  # epsilon-greedy, decayed linearly ...
EPS_FINISH = 0.005
EPS_DECAY = 0.2  # ... over 20% of the updates
INSTR_MAX_STEPS = 500  # an instruction episode without success ends with return 0 (choice)

# Evaluation and checkpoints.
EVAL_SUCCESS_THRESHOLD = 0.1  # an instruction is covered when its success rate is above (choice)
# Flags a resumed run may change: they do not change the training.
RESUME_FREE = {
    "resume",
    "track",
    "wandb_project_name",
    "run_dir",
    "eval_every",
    "eval_episodes",
    "eval_max_steps",
    "llm_base_url",
    "llm_timeout",
    "llm_concurrency",
}


# === Arguments ====================================================================================
@dataclasses.dataclass
class Args:
    """PQN on Craftax-Classic, trained on instructions an LLM proposes from what the agent did,
    rewarded by sentence-embedding similarity, drawn from a prioritized instruction buffer.
    Defaults are the paper's scale (1e8 steps, 1024 envs: hours on a GPU); README's quick start
    runs in minutes on a CPU."""

    exp_name: str = Path(__file__).stem
    """the name of this experiment (part of each run folder's name)"""
    seed: int = 1
    """seed of the experiment (Python, NumPy, JAX, LLM sampling)"""
    track: bool = False
    """log to Weights & Biases as well (imported only when set; $WANDB_ENTITY picks the team)"""
    wandb_project_name: str = "llm-relabeling"
    """the W&B project name"""
    run_dir: str = "runs"
    """parent folder of the run folders: TensorBoard logs and checkpoint.npz go to
    {run_dir}/{run name}"""
    resume: Optional[str] = None
    """continue exactly from a checkpoint ({run_dir}/{run name}/checkpoint.npz), with the flags
    of the run that wrote it"""
    prompts_dir: Optional[str] = None
    """folder holding oir/relabel.md, oir/seed_instructions.md, oir/eval_instructions.md (unset:
    prompts/ here)"""
    total_timesteps: int = 100_000_000
    """total environment steps (paper scale: 1e8, hours on a GPU; README's quick start: 12,288)"""
    num_envs: int = 1024
    """parallel (vmapped) environments (a multiple of 16, the optimistic-reset ratio; paper scale:
    1024, for a GPU)"""
    num_steps: int = 16
    """steps per environment per update (the rollout that is relabeled and learned from)"""
    hidden_size: int = 1024
    """width of each hidden layer (paper scale, as the PQN reference: 1024)"""
    num_layers: int = 4
    """hidden layers (Dense -> LayerNorm -> ReLU)"""
    lr: float = 1e-4
    """RAdam learning rate (decays linearly to 0)"""
    gamma: float = 0.99
    """discount factor"""
    num_minibatches: int = 4
    """minibatches per update (choice; the reference uses 1 with 1024x1 transitions)"""
    chunk_updates: int = 16
    """updates per jitted chunk; the host relabels, logs and evaluates between chunks (raise it to
    call the LLM less)"""
    embed_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """sentence-transformers model for f_instr and the event texts: hub id or local folder"""
    reward: Literal["semantic", "best", "gt"] = "semantic"
    """semantic: r = 1[cos(f_state, f_instr) > delta] for any transition text that fired (the
    paper); best: only the instruction's most similar text counts (more precise, docs/results.md);
    gt: the instruction's own ground truth, the transition row it names or was grounded on"""
    delta: float = 0.45
    """cosine threshold of the semantic reward (not published: choice; the paper reports it matters
    a lot)"""
    relabel: Literal["llm", "template", "none"] = "llm"
    """llm: open-ended LLM relabeling (the paper); template: achievement names as instructions
    (LLM-free); none: PQN"""
    relabel_k: int = 3
    """K, instructions asked per trajectory (not published: choice)"""
    # --- LLM client (the same seven flags in every script) ----------------------------------------
    llm_backend: Literal["openai", "transformers"] = "openai"
    """openai: any OpenAI-compatible endpoint (`vllm serve`, SGLang, llama.cpp, \
`transformers serve`, hosted; key from $OPENAI_API_KEY); transformers: the model in \
this process (offline runs with small local models)"""
    llm_model: str = "Qwen/Qwen3-8B"
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
    eval_every: int = 50
    """evaluate and save a checkpoint (over the previous one) every this many chunks (0 = only at
    the end)"""
    eval_episodes: int = 16
    """episodes per held-out instruction (paper scale: 16)"""
    eval_max_steps: int = 1000
    """steps per evaluation episode (paper scale: 1000)"""


# Declared range [low, high] (inclusive) of every int and float flag: what a real run could need.
# NaN and +-inf fail every range. A new numeric field needs an entry here (tests/test_bad_inputs.py
# fails otherwise). Cross-constraints (multiples, divisors, one chunk) stay in check_args.
RANGES = [
    # seeds: what NumPy, JAX and the LLM servers accept; eval_every, in chunks: any finite period
    (0, 2**32 - 1, ["seed", "eval_every"]),
    # Craftax's 1e9-step benchmark; gradient steps (<= 1.25 per env step) then fit JAX's int32 step
    # counters and schedules
    (1, 10**9, ["total_timesteps"]),
    # 2**13 envs x 2**8 steps x (obs + copies): ~30 GB per update, an H100's scale; 2**13 wide x 16
    # layers: 1e9 parameters
    (1, 2**13, ["num_envs", "hidden_size"]),
    # eval_episodes x 58 held-out instructions: the envs of one evaluation
    (1, 2**8, ["num_steps", "eval_episodes", "relabel_k", "llm_concurrency"]),
    (1, 16, ["num_layers"]),
    (
        1,
        2**16,
        [
            "num_minibatches",
            "chunk_updates",
            "eval_max_steps",
            "llm_max_new_tokens",
            "llm_timeout",  # seconds (18 h)
        ],
    ),
    (1e-9, 1.0, ["lr"]),
    (0.0, 1.0, ["gamma", "delta"]),  # delta: a cosine threshold; below 0 every event would reward
    (0.0, 2.0, ["llm_temperature"]),  # the OpenAI API's range
]


def usage_error(message: str):
    """A usage error ends the run with one line and exit status 2, as argparse (and tyro) do; data
    errors exit 1."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def num_relabel_copies(args):
    """Relabeled copies per update: a quarter of num_envs (choice), each one env's rollout with one
    achieved instruction."""
    return args.num_envs // 4 if args.relabel != "none" else 0


def check_args(args):
    """Usage errors as one line (`error: --flag: ...`, exit 2) before anything heavy."""
    chunk = args.chunk_updates * args.num_envs * args.num_steps
    # transitions per update (the rollout and its relabeled copies), split in minibatches
    rows = args.num_steps * (args.num_envs + num_relabel_copies(args))
    checks = [  # (field, valid?, what it must be); `low <= v <= high` is False for NaN too
        *[
            (name, low <= getattr(args, name) <= high, f"in [{low}, {high}]")
            for low, high, names in RANGES
            for name in names
        ],
        # the cross-checks RANGES cannot express
        ("num_envs", args.num_envs % OPTIMISTIC_RESET_RATIO == 0, "a multiple of 16"),
        (
            "num_minibatches",
            rows % max(args.num_minibatches, 1) == 0,
            f"a divisor of {rows} (transitions per update)",
        ),
        ("total_timesteps", args.total_timesteps >= chunk, f">= {chunk} (one chunk of updates)"),
        (
            "embed_model",
            Path(args.embed_model).is_dir() or re.fullmatch(r"[\w.-]+/[\w.-]+", args.embed_model),
            "an existing folder or a hub id (owner/name)",
        ),
        ("resume", args.resume is None or Path(args.resume).is_file(), "an existing file"),
    ]
    for name, ok, what in checks:
        if not ok:
            usage_error(f"--{name.replace('_', '-')}: must be {what}, got {getattr(args, name)}")
    # {run_dir} must be creatable and writable (exit 1), known before the learner compiles: a folder
    # is made, then removed, in its nearest existing parent; nothing is left behind
    parent = Path(args.run_dir).absolute()
    while not parent.exists():
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent))
    except OSError as e:  # under a file, /proc/..., a read-only place
        raise SystemExit(f"error: --run-dir: cannot create the run folder ({e})")


# === Method: transition events, the state side f_state of the semantic reward =====================
def as_rules(rules):
    """[(field, change, N)] -> three arrays (R,): field indices, change indices, thresholds."""
    return tuple(np.array(x, t) for x, t in zip(zip(*rules), (np.int32, np.int32, np.float32)))


def state_fields(s):
    """FIELDS of one Craftax-Classic state (vmap it): (F,) float32. near_*: one of the four cells
    next to the player."""
    pos = s.player_position

    def block(name):
        return BlockType[name.upper()].value

    def at(d):
        return s.map[pos[0] + d[0], pos[1] + d[1]]

    def adjacent(mobs):
        return ((jnp.abs(mobs.position - pos).sum(-1) == 1) & mobs.mask).any()

    front = at(DIRECTIONS[s.player_direction])
    around = jnp.stack([at(d) for d in DIRECTIONS[1:5]])
    values = [  # in FIELDS order
        *[getattr(s.inventory, n) for n in INVENTORY],
        s.player_health,
        s.player_food,
        s.player_drink,
        s.player_energy,
        s.is_sleeping,
        s.light_level,
        *s.achievements,
        *[front == block(b) for b in BLOCKS],  # facing_*
        *[(around == block(b)).any() for b in BLOCKS],  # near_* blocks
        *[adjacent(m) for m in (s.cows, s.zombies, s.skeletons)],  # near_* mobs
        *[(s.map == block(b)).sum() for b in PLACEABLE],  # placed_*
    ]
    return jnp.stack([jnp.asarray(v, jnp.float32) for v in values])


def fire(rules, prev_f, next_f):
    """Which rules (field, change, N; arrays (..., R)) hold in transitions prev_f -> next_f
    (..., F): (..., R) bool."""
    field, op, n = rules

    def take(f):
        return jnp.take_along_axis(f, jnp.broadcast_to(field, f.shape[:-1] + field.shape[-1:]), -1)

    a = take(prev_f)
    b = take(next_f)
    changes = [  # CHANGES order
        b > a,  # +
        b < a,  # -
        (a < n) & (b >= n),  # >=N: reached N from below
        (a >= n) & (b < n),  # <N: fell below N
    ]
    return jnp.stack([(op == i) & c for i, c in enumerate(changes)]).any(0)


# === Method: LLM relabeling (Section 3): event log -> proposals -> filter =========================
def event_log_text(events, env_done, texts):
    """The trajectory as text for the LLM, a line per step with transition texts: events (L, E),
    env_done (L,) bool."""
    lines = []
    for t in range(len(events)):
        happened = [texts[e] for e in np.flatnonzero(events[t])]
        if happened:
            lines.append(f"step {t}: " + "; ".join(happened))
        if env_done[t]:
            lines.append(f"step {t}: the agent died or the episode ended; a new world began")
    return "\n".join(lines[-MAX_LOG_LINES:]) if lines else "(nothing notable happened)"


def parse_proposals(raw):
    """LLM answer -> candidate instructions, one per line. The answer is untrusted text: only
    parsed, never executed."""
    # reasoning models (Qwen3) may think first
    raw = re.sub(r"<think>.*?(</think>|$)", "", raw, flags=re.DOTALL)
    lines = (
        _BULLET.sub("", line).strip().strip("\"'`").rstrip(".!;:").strip()
        for line in raw.splitlines()
    )
    return [line for line in lines if line]


def normalize(text):
    """One key for near-duplicates (choice): lowercase, no punctuation, no articles, a crude suffix
    stemmer, so tense, articles and plural make no new instruction ('collected a sapling' =
    'collect saplings' = 'collect sapling')."""

    def stem(w):
        return re.sub(r"(ing|ed|es|s|e)$", "", w) if len(w) > 3 else w

    return " ".join(
        stem(stem(w))  # twice: saplings -> sapling -> sapl
        for w in re.sub(r"[^a-z0-9 ]", " ", text.lower()).split()
        if w not in ("a", "an", "the", "some")
    )


def filter_proposals(candidates, k, observed_events, held, embed, delta):
    """The paper's rule-based filter (rules: our choice): at most k of the first
    FILTER_LINES_PER_K * k candidates that are short plain text, not addressed to the system, no
    duplicate of one held (Instructions): same `normalize` key or cosine > FILTER_DUP_SIM, and
    grounded: their best-matching transition text is above delta and observed in this log, and not
    its negation.
    Returns ([(text, row, emb)], rejections by reason)."""
    rejected = Counter()
    accepted = []
    seen = {normalize(h.text) for h in held}
    held = [h.emb for h in held]
    for i, text in enumerate(candidates):
        if len(accepted) >= k or i >= FILTER_LINES_PER_K * k:
            reason = "over_k"
        elif len(text) > FILTER_MAX_CHARS or len(text.split()) > FILTER_MAX_WORDS:
            reason = "too_long"
        elif not _ALLOWED.match(text):
            reason = "bad_chars"
        elif _INJECTION.search(text):
            reason = "injection"
        elif normalize(text) in seen:
            reason = "duplicate"
        else:
            emb = embed([text])[0]
            sims = embed.events @ emb
            best = int(np.argmax(sims))
            if held and max(float(h @ emb) for h in held) > FILTER_DUP_SIM:
                reason = "duplicate"
            elif sims[best] <= delta or best not in observed_events:
                reason = "not_grounded"
            elif _NEGATION.search(text) and not _NEGATION.search(embed.texts[best]):
                reason = "contradicts"  # e.g. "avoid the zombie" for "defeated a zombie"
            else:
                accepted.append((text, best, emb))
                seen.add(normalize(text))
                held.append(emb)
                continue
        rejected[reason] += 1
    return accepted, rejected


def relabel_rollout(traj, pool_emb, pool_mask, num_copies, rng):
    """Hindsight relabeling (paper Section 3), on device: num_copies random envs whose rollout
    achieved a pool instruction, each with one of them, rewards by its mask, cut at success.
    Returns (obs, action, emb, reward, done, env, valid)."""
    k_env, k_ins = jax.random.split(rng)
    hits = jnp.einsum(
        "tne,pe->np", traj["events"].astype(jnp.float32), pool_mask.astype(jnp.float32)
    )
    achieved = hits > 0  # (N, P); an empty pool slot has an empty mask: never achieved
    score = achieved.any(-1) + 0.5 * jax.random.uniform(k_env, achieved.shape[:1])
    env_idx = jax.lax.top_k(score, num_copies)[1]  # (R,)
    ach = achieved[env_idx]  # (R, P)
    choice = jnp.argmax(jnp.where(ach, jax.random.uniform(k_ins, ach.shape), -1.0), axis=-1)  # (R,)
    emb = pool_emb[choice]  # (R, D)
    valid = ach.any(-1)  # (R,)
    # (T, R): the copy's instruction is achieved at that step
    reward = (traj["events"][:, env_idx] & pool_mask[choice][None]).any(-1).astype(jnp.float32)
    # the relabeled instruction episode ends at success
    done = jnp.maximum(traj["env_done"][:, env_idx], reward)
    return (
        traj["obs"][:, env_idx],
        traj["action"][:, env_idx],
        emb,
        reward,
        done,
        env_idx,
        valid,
    )


# === Method: semantic reward r = 1[cos(f_state, f_instr) > delta] =================================
class Embedder:
    """f_instr, and the transition texts of f_state (`events`, (E, D)): a sentence encoder."""

    def __init__(self, model, event_texts):
        try:
            self.model = SentenceTransformer(model, device="cpu")
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --embed-model {model}: cannot load it ({e})") from None
        self.texts = event_texts
        self.events = self(event_texts)

    def __call__(self, texts):
        # on the host, once per new instruction, never per environment step
        return self.model.encode(texts, normalize_embeddings=True)  # float32


def semantic_mask(instr_emb, event_embs, delta, best=False):
    """Which events reward this instruction: cos(f_state, f_instr) > delta (paper); best: only its
    most similar event (--reward best): one threshold is brittle (at 0.45 "make a wooden pickaxe"
    matches 3 pickaxes), and best-match was more precise on a calibration set (docs/results.md)."""
    sims = event_embs @ instr_emb  # (E,) cosine: both sides are unit-normalised
    return (sims > delta) & ((sims >= sims.max()) | (not best))


# === Method: prioritized instruction buffer (statuses, sampling, eviction) ========================
@dataclasses.dataclass
class Instruction:
    text: str
    emb: np.ndarray  # (D,) unit-norm f_instr
    mask: np.ndarray  # (E,) bool, events that reward it
    successes: float = 0.0
    episodes: float = 0.0

    @property
    def mean_return(self):
        # an episode's return is 1 (success, the end) or 0
        return self.successes / max(self.episodes, 1e-9)


def make_instruction(text, row, embed, args):
    """f_instr(i) and the events that reward i: by the semantic reward, or (--reward gt) its own
    ground-truth row (a seed's or template's rule; for free text, the event it was grounded on)."""
    emb = embed([text])[0]
    gt = np.arange(len(embed.events)) == row
    semantic = semantic_mask(emb, embed.events, args.delta, args.reward == "best")
    return Instruction(text, emb, gt if args.reward == "gt" else semantic)


class InstructionBuffer:
    """B_max slots, statuses Failing / Learning-boundary / Mastered (paper Section 3). Eviction
    (choice): a newcomer replaces the best Mastered entry, else the most-tried Failing one, else is
    dropped: a curriculum."""

    def __init__(self, capacity=10):  # B_max = 10 (paper)
        self.slots = [None] * capacity

    def status(self, e):
        if e.episodes < STATUS_MIN_EPISODES:
            return "untested"
        if e.mean_return < STATUS_LOW:
            return "failing"
        if e.mean_return > STATUS_HIGH:
            return "mastered"
        return "boundary"

    def probs(self):
        w = [0.0 if e is None else STATUS_WEIGHTS[self.status(e)] for e in self.slots]
        return np.array(w) / sum(w)

    def update(self, successes, episodes):
        for e, succ, n in zip(self.slots, successes, episodes):
            if e is not None:
                e.successes += float(succ)
                e.episodes += float(n)
                if e.episodes > STATUS_WINDOW:  # forget old outcomes (approximate sliding window)
                    e.successes /= 2
                    e.episodes /= 2

    def add(self, entry):
        """Returns (slot or None, evicted text or None)."""
        mastered = self.having("mastered")
        if None in self.slots:
            victim = self.slots.index(None)
        elif mastered:
            victim = max(mastered, key=lambda i: self.slots[i].mean_return)
        else:
            victim = max(self.having("failing"), key=lambda i: self.slots[i].episodes, default=None)
        if victim is None:
            return None, None
        old = self.slots[victim]
        self.slots[victim] = entry
        return victim, old.text if old else None

    def having(self, status):
        return [i for i, e in enumerate(self.slots) if e and self.status(e) == status]

    def entries(self):
        return [e for e in self.slots if e is not None]

    def counts(self):
        return {s: len(self.having(s)) for s in STATUS_WEIGHTS}


def instruction_arrays(slots, num_events, dim):
    """The device's view of instructions (None = empty slot: zero rows, no event rewards or achieves
    it): embeddings (B, D), event masks (B, E)."""
    emb = np.stack([np.zeros(dim, np.float32) if e is None else e.emb for e in slots])
    mask = np.stack([np.zeros(num_events, bool) if e is None else e.mask for e in slots])
    return emb, mask


def device_tables(buffer, pool, embed):
    """train_chunk's inputs from the host: the buffer's embeddings, event masks and sampling
    probabilities, and the relabel pool's arrays (padded to RELABEL_POOL_SIZE)."""
    emb, mask = instruction_arrays(buffer.slots, *embed.events.shape)
    padded = list(pool) + [None] * (RELABEL_POOL_SIZE - len(pool))
    return emb, mask, buffer.probs(), instruction_arrays(padded, *embed.events.shape)


def relabel(llm, prompts, ec, buffer, pool, embed, args, rng, tally):
    """Paper Section 3: propose (per trajectory, the event log of the last RELABEL_LOG_LEN steps of
    a random env, K instructions out; --relabel template: its rows' instructions) -> filter
    (against that trajectory) -> admit (pool and buffer; a newcomer takes over the running
    episodes of the instruction it evicts)."""
    vocab = prompts.vocab
    template_rows = {text: r for r, text in enumerate(vocab.instructions)}
    ring = np.asarray(ec.ring)
    active = np.flatnonzero(ring.any((1, 2)))
    envs = rng.choice(active, min(RELABEL_TRAJS, len(active)), replace=False)
    events = ring[envs]
    env_done = np.asarray(ec.ring_done)[envs]
    if args.relabel == "template":
        answers = [
            "\n".join(vocab.instructions[r] for r in rng.permutation(np.flatnonzero(ev.any(0))))
            for ev in events
        ]
    else:
        logs = [event_log_text(ev, d, vocab.texts) for ev, d in zip(events, env_done)]
        requests = [prompts.relabel.substitute(k=args.relabel_k, trajectory=log) for log in logs]
        answers = llm.chat([[{"role": "user", "content": p}] for p in requests])
        tally.update(requests=len(answers), llm_failures=sum(a is None for a in answers))
    for answer, ev in zip(answers, events):
        if answer is None:  # a failed request, counted by the client
            continue
        candidates = parse_proposals(answer)
        observed = set(np.flatnonzero(ev.any(0)))
        held = buffer.entries() + list(pool)
        accepted, rejected = filter_proposals(
            candidates, args.relabel_k, observed, held, embed, args.delta
        )
        tally.update({f"rejected_{r}": c for r, c in rejected.items()})
        for text, row, _ in accepted:
            row = template_rows.get(text, row)  # a template names its row: its ground truth
            instruction = make_instruction(text, row, embed, args)
            pool.append(instruction)
            slot, evicted = buffer.add(instruction)
            tally.update(accepted=1, added=slot is not None)
            print(
                f"relabel: accepted {text!r} (matches event: {vocab.texts[row]}); buffer slot "
                f"{slot} (None: not admitted), evicted {evicted!r}"
            )


# === Learner: PQN (LayerNorm MLP, Q(lambda), rollout + update in one lax.scan) ====================
class QNetwork(nn.Module):
    """Q(s, ., f_instr(i)): PQN's (Dense -> LayerNorm -> ReLU) x num_layers on [obs, f_instr(i)]
    (concat: choice)."""

    action_dim: int
    hidden_size: int
    num_layers: int

    @nn.compact
    def __call__(self, obs, instr):
        x = jnp.concatenate([obs, instr], axis=-1)
        for _ in range(self.num_layers):
            x = nn.relu(nn.LayerNorm()(nn.Dense(self.hidden_size)(x)))
        return nn.Dense(self.action_dim)(x)


def lambda_returns(rewards, dones, next_q_max, gamma, lam):
    """Peng's Q(lambda) targets backwards, as PQN's `_get_target`; rewards, dones, next_q_max
    (T, B): G_t = r_t + gamma (1 - d_t) [(1 - lam) max_a Q(s_t+1, a) + lam G_t+1], G_T =
    next_q_max[-1], so that G_T-1 bootstraps from max_a Q(s_T, a) alone."""

    def body(g_next, x):
        r, d, nq = x
        g = r + gamma * (1.0 - d) * ((1.0 - lam) * nq + lam * g_next)
        return g, g

    _, g = jax.lax.scan(body, next_q_max[-1], (rewards, dones, next_q_max), reverse=True)
    return g


def q_loss(params, apply_fn, obs, instr, action, target, weight):
    """PQN's TD loss 0.5 (Q(s, a, i) - G)^2, weighted (relabeled copies without an achieved
    instruction weigh 0)."""
    q = apply_fn(params, obs, instr)  # (B, A)
    q_a = jnp.take_along_axis(q, action[:, None], axis=-1)[:, 0]  # (B,)
    wsum = jnp.maximum(weight.sum(), 1.0)
    loss = 0.5 * (weight * jnp.square(q_a - target)).sum() / wsum
    return loss, {
        "losses/td_loss": loss,
        "losses/q_values": (weight * q_a).sum() / wsum,
    }


def make_learn(network, args, num_copies):
    def learn(ts, traj, table, pool_emb, pool_mask, rng):
        """One pass (the reference's NUM_EPOCHS = 1) over the rollout and its relabeled copies,
        shuffled minibatches."""

        def targets(q_val, last_obs, last_instr, reward, done):
            """Q(lambda) targets of a (T, B) rollout from its Q-values at collection and Q (current
            params) at the observation after it."""
            q_last = network.apply(ts.params, last_obs, last_instr).max(-1)
            q_next = jnp.concatenate([q_val[1:].max(-1), q_last[None]], axis=0)
            return lambda_returns(reward, done, q_next, args.gamma, Q_LAMBDA)

        T = len(traj["action"])
        k, k_perm = jax.random.split(rng)
        # Instructions travel as indices into a small table (buffer slots, then one row per
        # relabeled copy) and are gathered per minibatch: cheaper than shuffling a (T, N, D) array.
        target = targets(
            traj["q_val"],
            traj["last_obs"],
            table[traj["slot"][-1]],
            traj["reward"],
            traj["done"],
        )
        data = [
            traj["obs"],
            traj["slot"],  # (T, N): rows of table
            traj["action"],
            target,
            jnp.ones_like(target),  # weight
        ]
        info = {}
        if num_copies > 0:
            obs, act, emb, rew, done, env, valid = relabel_rollout(
                traj, pool_emb, pool_mask, num_copies, k
            )
            # Q of the copies under their new instruction (not available from the rollout): current
            # params.
            q = network.apply(ts.params, obs, jnp.broadcast_to(emb[None], (T, *emb.shape)))
            target = targets(q, traj["last_obs"][env], emb, rew, done)
            copy_idx = jnp.broadcast_to(table.shape[0] + jnp.arange(num_copies), (T, num_copies))
            # no achieved instruction: weight 0 (bool, made float by the concatenation below)
            weight = jnp.broadcast_to(valid, (T, num_copies))
            data = [
                jnp.concatenate(pair, 1) for pair in zip(data, [obs, copy_idx, act, target, weight])
            ]
            table = jnp.concatenate([table, emb], 0)
            info = {"relabel/copies_valid": valid.sum()}
        perm = jax.random.permutation(k_perm, T * data[0].shape[1])
        mbs = [
            x.reshape(-1, *x.shape[2:])[perm].reshape(args.num_minibatches, -1, *x.shape[2:])
            for x in data
        ]

        def minibatch(ts, mb):
            obs, idx, action, target, weight = mb
            grad_fn = jax.value_and_grad(q_loss, has_aux=True)
            (_, minfo), grads = grad_fn(
                ts.params, network.apply, obs, table[idx], action, target, weight
            )
            return ts.apply_gradients(grads=grads), minfo

        ts, minfo = jax.lax.scan(minibatch, ts, mbs)
        return ts, {**info, **{k: v.mean() for k, v in minfo.items()}}

    return learn


def make_rollout(network, vec_step, rules, args):
    """num_steps of all envs, each following the instruction of its buffer slot (epsilon-greedy, as
    PQN), rewarded when an event of that instruction fires."""
    N = args.num_envs
    fields = jax.vmap(state_fields)

    def rollout(params, ec, table_emb, table_mask, slot_logits, eps, rng):
        def step(carry, _):
            ec, rng = carry
            rng, k_a, k_e, k_env, k_slot = jax.random.split(rng, 5)
            q = network.apply(params, ec.obs, table_emb[ec.slot])  # (N, A)
            explore = jax.random.uniform(k_e, (N,)) < eps  # epsilon-greedy (PQN)
            action = jnp.where(explore, jax.random.randint(k_a, (N,), 0, q.shape[-1]), q.argmax(-1))
            obs, env_state, state_st, env_done = vec_step(k_env, ec.env_state, action)
            # (N, E) transition texts that hold
            events = fire(rules, fields(ec.env_state), fields(state_st))
            # r = 1[cos > delta], the cosine test done on the host (table_mask)
            success = (events & table_mask[ec.slot]).any(-1)
            instr_t = ec.instr_t + 1
            idone = env_done | success | (instr_t >= INSTR_MAX_STEPS)
            # an ended instruction episode draws its next instruction
            new_slot = jax.random.categorical(k_slot, slot_logits, shape=(N,))
            # done: the instruction episode ended (success, timeout or env end); q_val: Q at
            # collection (for the lambda-returns)
            tr = dict(
                obs=ec.obs,
                action=action,
                reward=success.astype(jnp.float32),
                done=idone.astype(jnp.float32),
                env_done=env_done,
                events=events,
                slot=ec.slot,
                q_val=q,
            )
            ec = ec.replace(
                env_state=env_state,
                obs=obs,
                slot=jnp.where(idone, new_slot, ec.slot),
                instr_t=jnp.where(idone, 0, instr_t),
            )
            return (ec, rng), tr

        (ec, _), tr = jax.lax.scan(step, (ec, rng), None, args.num_steps)

        # The rollout's steps enter the event-log history (the last RELABEL_LOG_LEN steps per env).
        def window(old, new):
            return jnp.concatenate([old, new.swapaxes(0, 1)], 1)[:, -RELABEL_LOG_LEN:]

        ec = ec.replace(
            ring=window(ec.ring, tr["events"]),
            ring_done=window(ec.ring_done, tr["env_done"]),
        )
        # (T, N, ...) each; last_obs (N, obs_dim): the observation after the rollout
        traj = {**tr, "last_obs": ec.obs}

        def per_slot(x):  # outcomes per buffer slot, (B,)
            return jnp.zeros(table_emb.shape[0]).at[traj["slot"]].add(x)

        stats = dict(slot_success=per_slot(traj["reward"]), slot_episodes=per_slot(traj["done"]))
        return ec, traj, stats

    return rollout


def make_train_chunk(network, vec_step, rules, args, num_updates):
    """chunk_updates x (collect a rollout, learn on it and its relabeled copies), one jitted
    lax.scan."""
    rollout = make_rollout(network, vec_step, rules, args)
    learn = make_learn(network, args, num_relabel_copies(args))
    # per update
    eps_fn = optax.linear_schedule(EPS_START, EPS_FINISH, max(int(EPS_DECAY * num_updates), 1))

    @jax.jit
    def train_chunk(ts, ec, rng, table_emb, table_mask, slot_probs, pool):
        def update(carry, _):
            ts, ec, rng = carry
            rng, k_roll, k_learn = jax.random.split(rng, 3)
            eps = eps_fn(ts.step // args.num_minibatches)
            ec, traj, stats = rollout(
                ts.params, ec, table_emb, table_mask, jnp.log(slot_probs), eps, k_roll
            )
            ts, info = learn(ts, traj, table_emb, *pool, k_learn)
            return (ts, ec, rng), {**info, **stats, "charts/epsilon": eps}

        (ts, ec, _), infos = jax.lax.scan(update, (ts, ec, rng), None, args.chunk_updates)
        return ts, ec, infos

    return train_chunk


def check_memory(jitted, *inputs):
    """jitted compiled for inputs (shapes suffice). Ends the run with one line when XLA's memory
    plan for it exceeds the device's memory (RAM on CPU): flags whose product cannot fit (envs x
    steps, width x layers) stop before anything is allocated, not in an out-of-memory error or
    the kernel's OOM killer mid-run. The check is ours (the summaries and PQN have none)."""
    compiled = jitted.lower(*inputs).compile()
    plan = compiled.memory_analysis()
    need = plan.argument_size_in_bytes + plan.output_size_in_bytes + plan.temp_size_in_bytes
    limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")  # none on CPU
    limit = limit or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > limit:
        usage_error(
            "--num-envs x --num-steps, --hidden-size x --num-layers: a chunk of updates needs "
            f"{need / 2**30:.1f} GiB, this machine has {limit / 2**30:.1f} GiB"
        )
    return compiled


def init_train(env, env_params, network, buffer, embed, args, num_chunks, rng):
    """The learner's state (RAdam, clipped, linear decay to 0: the reference's optimiser) and the
    envs' carry."""
    k_init, k_env, k_slot = jax.random.split(rng, 3)
    N = args.num_envs
    E, D = embed.events.shape
    obs, env_state = reset_envs(env, env_params, k_env, N)
    params = network.init(k_init, obs[:1], jnp.zeros((1, D)))
    lr = optax.linear_schedule(
        args.lr, 1e-20, num_chunks * args.chunk_updates * args.num_minibatches
    )
    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.radam(learning_rate=lr))
    ts = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    slot = jax.random.categorical(k_slot, jnp.log(buffer.probs()), shape=(N,))
    return ts, EnvCarry(
        strong_types(env_state),
        obs,
        slot,
        jnp.zeros(N, jnp.int32),  # instr_t
        jnp.zeros((N, RELABEL_LOG_LEN, E), bool),  # ring
        jnp.zeros((N, RELABEL_LOG_LEN), bool),  # ring_done
    )


# === Environment and data =========================================================================
def strong_types(tree):
    """After reset some leaves are weakly typed, after step strongly: without this every jitted
    function compiles twice."""
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, x.dtype), tree)


def reset_envs(env, env_params, rng, n):
    """n fresh worlds: (obs, states), batched."""
    return jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(rng, n), env_params)


def make_vec_env_step(env, env_params, num_envs):
    """Step all envs; envs that end get one of num_envs // 16 fresh worlds (purejaxql's optimistic
    resets). Also returns the stepped state before the reset, whose transition gives the events."""
    num_resets = num_envs // OPTIMISTIC_RESET_RATIO

    def step(rng, state, action):
        k_step, k_reset, k_pick = jax.random.split(rng, 3)
        obs_st, state_st, _, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_step, num_envs), state, action, env_params
        )
        obs_re, state_re = reset_envs(env, env_params, k_reset, num_resets)
        reset_idx = jnp.arange(num_resets).repeat(OPTIMISTIC_RESET_RATIO)
        being_reset = jax.random.choice(
            k_pick, num_envs, (num_resets,), p=done.astype(jnp.float32), replace=False
        )
        reset_idx = reset_idx.at[being_reset].set(jnp.arange(num_resets))

        def pick(fresh, old):
            return jnp.where(done.reshape(-1, *[1] * (old.ndim - 1)), fresh[reset_idx], old)

        state = jax.tree_util.tree_map(pick, strong_types(state_re), state_st)
        return pick(obs_re, obs_st), state, state_st, done

    return step


@flax.struct.dataclass
class EnvCarry:
    env_state: object
    obs: jnp.ndarray  # (N, obs_dim)
    slot: jnp.ndarray  # (N,) buffer slot of the instruction each env follows
    instr_t: jnp.ndarray  # (N,) steps into the current instruction episode
    ring: jnp.ndarray  # (N, L, E) events of the last L steps, oldest first (for the event log)
    ring_done: jnp.ndarray  # (N, L) env episode ended at that step


class Vocabulary(NamedTuple):
    """prompts/oir/transitions.md: one row per transition text."""

    keys: list  # (field index, change index, N): the rule that fires the text
    texts: list  # transition texts, embedded once (f_state's side of the semantic reward)
    instructions: list  # the row as an instruction (--relabel template)


class Prompts(NamedTuple):
    """The prompt folder (prompts/oir/), read and checked before anything heavy."""

    relabel: Template  # relabel.md, with placeholders k and trajectory
    vocab: Vocabulary  # transitions.md
    seeds: list  # seed_instructions.md: (text, vocabulary row)
    evals: list  # eval_instructions.md: (kind, text, ground-truth rules, ordered?, negated?)


def read_prompt(path, columns=0):
    """A prompt-folder file (header, `---` line, body): the body, or its `a | b` rows as (line
    number, [cells])."""
    try:
        head, _, body = path.read_text("utf-8").partition("\n---\n")
    except (OSError, UnicodeError) as e:
        raise SystemExit(f"error: {path}: cannot read it ({e})") from None
    rows = [
        (n, [cell.strip() for cell in line.split("|")])
        # numbered as in the file: the body starts after the header and the `---` line
        for n, line in enumerate(body.splitlines(), head.count("\n") + 3)
        if line.strip() and not line.lstrip().startswith("#")
    ]
    # no `---` line (then no body), or nothing after it: no prompt, vocabulary or instruction
    if not rows:
        raise SystemExit(f"error: {path}: no line '---' between the header and a body")
    for n, cells in rows if columns else []:
        if len(cells) != columns:
            raise SystemExit(f"error: {path}:{n}: expected {columns} columns separated by '|'")
    return rows if columns else body


def parse_rule(path, n, term):
    """`field change` (e.g. `wood >=3`, `health +`) -> (field index, change index, N); a bad term is
    a data error."""
    m = re.fullmatch(r"(\w+)\s*(\+|-|>=|<)\s*(-?\d+(?:\.\d+)?)?", term.strip())
    if not m or m[1] not in FIELDS or (m[2] in "+-") == bool(m[3]):
        raise SystemExit(
            f"error: {path}:{n}: bad rule {term!r}: a field ({FIELDS[0]}, ...), then +, -, >=N "
            "or <N"
        )
    return FIELDS.index(m[1]), CHANGES.index(m[2]), float(m[3] or 0)


def load_prompts(folder):
    """The prompt folder's files; a bad file ends in one `error: <file>:<line>: ...`."""
    relabel_prompt = Template(read_prompt(folder / "relabel.md"))
    try:  # placeholders checked now, not at the first relabeling
        relabel_prompt.substitute(k=1, trajectory="")
    except (KeyError, ValueError) as e:
        raise SystemExit(
            f"error: {folder}/relabel.md: bad placeholder {e} (allowed: k, trajectory)"
        ) from None
    path = folder / "transitions.md"
    rows = read_prompt(path, 4)
    keys = [parse_rule(path, n, f"{field} {change}") for n, (field, change, _, _) in rows]
    vocab = Vocabulary(
        keys,
        [r[2] for _, r in rows],  # texts
        [r[3] for _, r in rows],  # instructions
    )
    seeds = []
    path = folder / "seed_instructions.md"
    for n, (text, rule) in read_prompt(path, 2):
        key = parse_rule(path, n, rule)
        if key not in keys:
            raise SystemExit(f"error: {path}:{n}: {rule!r} is not a row of transitions.md")
        seeds.append((text, keys.index(key)))
    evals = []
    path = folder / "eval_instructions.md"
    for n, (kind, text, truth) in read_prompt(path, 3):
        rules = truth.removeprefix("never ")  # a negation: success when the rules did not all hold
        terms = [parse_rule(path, n, t) for t in re.split(" then | and ", rules)]
        evals.append((kind, text, terms, " then " in truth, rules != truth))
    return Prompts(relabel_prompt, vocab, seeds, evals)


# === Evaluation, logging and checkpoints ==========================================================
def make_evaluate(env, env_params, network, embed, rows, rules, args):
    """Held-out (kind, text, ground-truth rules, ordered?, negated?), eval_episodes greedy episodes
    each in fresh worlds. Success: every rule held at some step (ordered: in order; negated: not
    all held, "never"). Success and coverage per kind, and the semantic reward (fired in the
    episode or not) against success: precision, recall, kappa."""
    kinds, texts, truths, ordered, negated = zip(*rows)
    kinds = np.array(kinds)
    K = max(map(len, truths))
    terms = [as_rules(t + t[-1:] * (K - len(t))) for t in truths]  # padded to K, masked
    text_emb = embed(texts)

    def rep(x):  # one row per episode (x: an array, or a sequence of rows)
        return jnp.repeat(jnp.asarray(x), args.eval_episodes, 0)

    emb = rep(text_emb)
    truth = tuple(rep(x) for x in zip(*terms))
    valid = rep(np.arange(K)[None] < np.array([len(t) for t in truths])[:, None])
    # the rule under test (with --reward gt: the paper's)
    sem_mask = rep(
        [semantic_mask(e, embed.events, args.delta, args.reward == "best") for e in text_emb]
    )
    ordered = rep(ordered)
    negated = rep(negated)
    n = emb.shape[0]
    fields = jax.vmap(state_fields)

    @jax.jit
    def evaluate(params, rng):
        rng, k = jax.random.split(rng)
        obs, state = reset_envs(env, env_params, k, n)

        def step(carry, _):
            obs, state, alive, got, sem, rng = carry
            rng, k = jax.random.split(rng)
            action = network.apply(params, obs, emb).argmax(-1)
            obs2, state2, _, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k, n), state, action, env_params
            )
            f0 = fields(state)
            f1 = fields(state2)
            # an ordered instruction's term counts once all the terms before it held
            in_order = jnp.cumprod(
                jnp.pad(got, ((0, 0), (1, 0)), constant_values=True)[:, :-1], 1
            ).astype(bool)
            got = got | (fire(truth, f0, f1) & (in_order | ~ordered[:, None]) & alive[:, None])
            # the semantic reward would have fired
            sem = sem | ((fire(rules, f0, f1) & sem_mask).any(-1) & alive)
            return (obs2, state2, alive & ~done, got, sem, rng), None

        init = (
            obs,
            strong_types(state),
            jnp.ones(n, bool),  # alive
            jnp.zeros(valid.shape, bool),  # got: each ground-truth rule held
            jnp.zeros(n, bool),  # sem: the semantic reward fired
            rng,
        )
        (_, _, _, got, sem, _), _ = jax.lax.scan(step, init, None, args.eval_max_steps)
        return (
            ((got | ~valid).all(-1) ^ negated).reshape(-1, args.eval_episodes),  # success
            sem.reshape(-1, args.eval_episodes),  # the semantic reward fired
        )

    def evaluate_and_log(params, writer, step, rng):
        t0 = time.time()
        succ, sem = (np.asarray(x) for x in evaluate(params, rng))  # (M, episodes) each
        log_evaluation(succ, sem, texts, kinds, writer, step, t0)

    return evaluate_and_log


def reward_quality(s, t):
    """Precision, recall and Cohen's kappa of the semantic reward (s: it fired in the episode)
    against ground-truth success t, over episodes; NaN where undefined (nothing fired, say).
    Agreement alone would hide the errors: positives are rare."""
    with np.errstate(divide="ignore", invalid="ignore"):
        tp = (s & t).sum()
        chance = s.mean() * t.mean() + (1 - s.mean()) * (1 - t.mean())
        return tp / s.sum(), tp / t.sum(), ((s == t).mean() - chance) / (1 - chance)


def log_evaluation(succ, sem, texts, kinds, writer, step, t0):
    """Success rate per held-out instruction, coverage per kind, and per kind the semantic reward's
    precision, recall and kappa against ground truth: to TensorBoard (`eval/`) and printed."""
    rates = succ.mean(1)
    covered = rates > EVAL_SUCCESS_THRESHOLD
    lines = []
    m = {}
    for kind in sorted(set(kinds)):
        s = sem[kinds == kind]
        t = succ[kinds == kind]
        c = covered[kinds == kind]
        precision, recall, kappa = reward_quality(s, t)
        m |= {
            f"eval/coverage_{kind}": int(c.sum()),
            f"eval/reward_precision_{kind}": precision,
            f"eval/reward_recall_{kind}": recall,
            f"eval/reward_kappa_{kind}": kappa,
        }
        lines.append(
            f"{kind}: coverage {c.sum()}/{c.size}; semantic reward vs ground truth over {s.size} "
            f"episodes: precision {precision:.2f}, recall {recall:.2f}, kappa {kappa:.2f} "
            f"(semantic {s.sum()}, truth {t.sum()}, both {(s & t).sum()})"
        )
    m |= {"eval/coverage": int(covered.sum()), "eval/mean_success": float(rates.mean())}
    for key, v in m.items():
        writer.add_scalar(key, v, step)
    for kind, text, s in zip(kinds, texts, rates):
        print(f"  eval success {s:5.2f}  [{kind}] {text}")
    print(
        f"eval coverage {m['eval/coverage']}/{len(rates)} (success > {EVAL_SUCCESS_THRESHOLD}) at "
        f"step {step}, mean success {m['eval/mean_success']:.3f} ({time.time() - t0:.1f}s)\n  "
        + "\n  ".join(lines)
    )


def open_run(args, run_name):
    """{run_dir}/{run_name} (made only now: a run that fails before training leaves no folder
    behind), W&B with --track, and the TensorBoard writer with the hyperparameters as a table."""
    run_dir = Path(args.run_dir) / run_name  # made by the writer (check_args made sure it can be)
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            config=vars(args),
            name=run_name,
            sync_tensorboard=True,
        )
    writer = SummaryWriter(run_dir)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()),
    )
    return run_dir, writer


def log_chunk(writer, chunk, step, sps, infos, buffer, tally):
    """A chunk's throughput, losses, instruction outcomes, buffer statuses and relabel counts; a
    non-finite loss ends the run (exit 1)."""
    # the instruction success of training (slot_*) is printed; the held-out evaluation is logged
    scalars = {"charts/SPS": sps} | {
        key: v.mean()
        for key, v in infos.items()
        if key.startswith(("charts/", "losses/", "relabel/"))
    }
    scalars |= {f"buffer/{k}": c for k, c in buffer.counts().items()}
    scalars |= {f"relabel/{k}": c for k, c in tally.items()}
    for key, v in scalars.items():
        writer.add_scalar(key, v, step)  # NumPy or Python numbers, as in log_evaluation
    print(
        f"chunk {chunk}: step {step}, SPS {sps:.0f}, td_loss "
        f"{scalars['losses/td_loss']:.4f}, instruction success "
        f"{infos['slot_success'].sum():.0f}/{infos['slot_episodes'].sum():.0f}, relabeled "
        f"copies/update {scalars.get('relabel/copies_valid', 0.0):.1f}, buffer {buffer.counts()}"
    )
    if not np.isfinite(scalars["losses/td_loss"]):  # diverged: stop before a checkpoint saves it
        raise SystemExit(
            f"error: update {(chunk + 1) * len(infos['losses/td_loss'])}: loss is "
            f"{scalars['losses/td_loss']} (chunk {chunk} diverged; nothing of it is saved)"
        )


def print_summary(env_steps, gradient_steps, tally, buffer):
    print(
        f"done: {env_steps} env steps, {gradient_steps} gradient steps, {tally['accepted']} "
        f"relabeled instructions accepted ({tally['requests']} LLM requests, "
        f"{tally['llm_failures']} failed), {tally['added']} entered the buffer; counts: "
        f"{dict(tally)}"
    )
    print("final buffer:", [(e.text, buffer.status(e), e.mean_return) for e in buffer.entries()])


def instruction_to_dict(e):
    """An Instruction (None: an empty slot) as JSON values."""
    return e and {**vars(e), "emb": e.emb.tolist(), "mask": e.mask.tolist()}


def instruction_from_dict(d):
    return d and Instruction(
        **{**d, "emb": np.array(d["emb"], np.float32), "mask": np.array(d["mask"])}
    )


def save_checkpoint(out, device, host, buffer, pool, step):
    """checkpoint.npz: device state (params, optimizer incl. the LR schedule's count, step, env
    states and event history, JAX key) as arrays, host state (chunk, NumPy generator, tally, buffer,
    pool) as JSON; atomic rename."""
    host = {
        **host,
        "buffer": [instruction_to_dict(e) for e in buffer.slots],
        "pool": [instruction_to_dict(e) for e in pool],
    }
    # np.savez makes every value a NumPy array (host: a 0-d string)
    leaves = {f"leaf_{i}": x for i, x in enumerate(jax.tree_util.tree_leaves(device))}
    np.savez(out / "checkpoint.tmp.npz", host=json.dumps(host), **leaves)
    os.replace(out / "checkpoint.tmp.npz", out / "checkpoint.npz")
    print(f"checkpoint saved to {out}/checkpoint.npz, step {step}")


def load_checkpoint(path, device, args, buffer, pool, tally, np_rng):
    """Inverse of save_checkpoint (`device`: a fresh state, for the tree structure);
    refills buffer, pool, tally and the NumPy generator. Returns (device state, next chunk)."""
    try:  # any decoding or structure failure: the file is not one of our checkpoints
        with np.load(path) as f:
            host = json.loads(str(f["host"]))  # deep nesting: RecursionError
            leaves = [f[f"leaf_{i}"] for i in range(len(f.files) - 1)]
        for flag, value in host["args"].items():  # flags that change the training must match
            if flag not in RESUME_FREE and getattr(args, flag, value) != value:
                usage_error(f"--resume: {path} was written with --{flag.replace('_', '-')} {value}")
        # arrays that do not fit this run (another count, shape or dtype: another script's, or
        # hand-edited) fail here, not in the compiled train_chunk; np.dtype's on both sides (the
        # fresh state's step is a Python int)
        fresh, tree = jax.tree_util.tree_flatten(device)
        shapes = [(x.shape, x.dtype) for x in map(jnp.asarray, fresh)]
        if [(x.shape, x.dtype) for x in leaves] != shapes:
            raise ValueError("arrays of other shapes than this run's")
        device = jax.tree_util.tree_unflatten(tree, [jnp.asarray(x) for x in leaves])
        buffer.slots = [instruction_from_dict(d) for d in host["buffer"]]
        pool.extend(instruction_from_dict(d) for d in host["pool"])
        tally.update(host["tally"])
        np_rng.bit_generator.state = host["np_rng"]
        start = host["chunk"] + 1
    except (
        OSError,
        EOFError,
        BadZipFile,
        ValueError,  # JSON and NumPy decoding
        LookupError,  # a missing key or member
        TypeError,
        AttributeError,  # an entry of the wrong type
        RecursionError,
    ) as e:
        raise SystemExit(
            f"error: {path}: not a checkpoint of this script ({type(e).__name__}: {e})"
        ) from None
    return device, start


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
def main():
    args = tyro.cli(Args)
    prompts_dir = Path(args.prompts_dir or Path(__file__).resolve().parent / "prompts") / "oir"
    check_args(args)
    prompts = load_prompts(prompts_dir)
    llm = LLMClient(args) if args.relabel == "llm" else None  # a wrong --llm-base-url fails here
    steps_per_chunk = args.chunk_updates * args.num_envs * args.num_steps
    num_chunks = args.total_timesteps // steps_per_chunk
    # Seeding: NumPy for the host's choices, JAX for all on device (the LLM requests carry it too).
    np_rng = np.random.default_rng(args.seed)
    rng = jax.random.PRNGKey(args.seed)

    # auto_reset=False: we reset optimistically (auto-reset makes a world every step, ~10x slower).
    env = make_craftax_env_from_name(ENV_ID, auto_reset=False)
    env_params = env.default_params
    embed = Embedder(args.embed_model, prompts.vocab.texts)
    rules = as_rules(prompts.vocab.keys)
    buffer = InstructionBuffer()
    pool = deque(maxlen=RELABEL_POOL_SIZE)
    tally = Counter()
    for text, row in prompts.seeds:
        buffer.add(make_instruction(text, row, embed, args))

    network = QNetwork(env.action_space(env_params).n, args.hidden_size, args.num_layers)
    vec_step = make_vec_env_step(env, env_params, args.num_envs)
    train_chunk = make_train_chunk(network, vec_step, rules, args, num_chunks * args.chunk_updates)
    rng, k = jax.random.split(rng)
    ts, ec = init_train(env, env_params, network, buffer, embed, args, num_chunks, k)
    evaluate_and_log = make_evaluate(env, env_params, network, embed, prompts.evals, rules, args)
    start = 0
    run_name = f"{ENV_ID}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.resume:  # rebuilt, not restored: the jitted functions, the encoder, the env, the LLM
        (ts, ec, rng), start = load_checkpoint(
            args.resume, (ts, ec, rng), args, buffer, pool, tally, np_rng
        )
        run_name = Path(args.resume).parent.name
        print(
            f"[resume] {args.resume}: chunk {start} of {num_chunks}, step {start * steps_per_chunk}"
        )
    # The learner's state fits (RANGES: <= 1e9 parameters); a chunk's rollouts and minibatches
    # (envs x steps x observation) may not: checked before the first chunk allocates them.
    train_chunk = check_memory(train_chunk, ts, ec, k, *device_tables(buffer, pool, embed))
    run_dir, writer = open_run(args, run_name)
    # the plan; the chunk bar's ETA leaves the evaluations (one jitted call each) out
    print(
        f"[plan] OIR-PQN on {ENV_ID}: {num_chunks * steps_per_chunk} env steps in {num_chunks} "
        f"chunks of {args.chunk_updates} updates ({args.num_envs} envs x {args.num_steps} steps); "
        f"relabel={args.relabel}, reward={args.reward}; evaluation every {args.eval_every} chunks "
        f"(0: none) and at the end: {len(prompts.evals)} instructions x {args.eval_episodes} each"
    )

    for chunk in tqdm(range(start, num_chunks), desc="chunks", initial=start, total=num_chunks):
        t0 = time.time()
        global_step = (chunk + 1) * steps_per_chunk
        rng, k, k_eval = jax.random.split(rng, 3)
        # 1. Rollout + PQN update on it and its relabeled copies, chunk_updates times, one jit call.
        ts, ec, infos = train_chunk(ts, ec, k, *device_tables(buffer, pool, embed))
        infos = jax.tree_util.tree_map(np.asarray, infos)
        # 2. Buffer statuses from the instruction episodes that ended.
        buffer.update(infos["slot_success"].sum(0), infos["slot_episodes"].sum(0))
        # 3. Relabel: event logs of recent trajectories -> LLM proposals -> filter -> pool, buffer.
        if args.relabel != "none":
            relabel(llm, prompts, ec, buffer, pool, embed, args, np_rng, tally)
        # Throughput, relabeling included, evaluation excluded (train_chunk was compiled above).
        log_chunk(
            writer, chunk, global_step, steps_per_chunk / (time.time() - t0), infos, buffer, tally
        )
        # 4. Evaluation and a checkpoint.
        if chunk + 1 == num_chunks or (args.eval_every > 0 and (chunk + 1) % args.eval_every == 0):
            evaluate_and_log(ts.params, writer, global_step, k_eval)
            host = dict(
                chunk=chunk, np_rng=np_rng.bit_generator.state, tally=tally, args=vars(args)
            )
            save_checkpoint(run_dir, (ts, ec, rng), host, buffer, pool, global_step)

    print_summary(num_chunks * steps_per_chunk, int(ts.step), tally, buffer)
    writer.close()


if __name__ == "__main__":
    main()
