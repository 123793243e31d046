"""OIR: Open-ended Instruction Relabeling with LLMs, on Craftax, with a PQN learner.

Paper: Zhang, Wang, Du, Fang, "Learning Instruction-Following Policies through Open-Ended Instruction Relabeling with
Large Language Models" (arXiv 2506.20061). Learner: PQN ("Simplifying Deep Temporal Difference Learning", Gallici et
al., arXiv 2407.04811), following mttga/purejaxql `pqn_craftax.py`: no replay buffer, no target network, LayerNorm MLP,
epsilon-greedy with decay, Q(lambda) returns, RAdam, optimistic resets, rollout + update jitted with `lax.scan`.

The loop (`main`): vmapped Craftax environments follow instructions sampled from a prioritized buffer, rewarded by
r = 1[cos(f_state(s_t, s_t+1), f_instr(i)) > delta] -> recent trajectories become event logs -> an LLM proposes K
instructions the agent accomplished -> rule-based filter -> buffer update -> PQN update on the rollout and its relabeled
copies -> evaluation on held-out instructions. Choices where the paper is silent: "choice" here, and docs/oir_pqn.md.

    python oir_pqn.py --llm-base-url http://localhost:8000/v1 --llm-model Qwen/Qwen3-8B  # after `vllm serve <model>`
    python oir_pqn.py --relabel template --total-timesteps 1000000          # LLM-free baseline (also: --relabel none)
    python oir_pqn.py --llm-backend transformers --llm-model path/to/SmolLM2-135M-Instruct \
        --embed-model path/to/all-MiniLM-L6-v2 --total-timesteps 24576 --num-envs 64 --num-steps 8 --hidden-size 128
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
import time
from collections import Counter, deque
from pathlib import Path
from string import Template
from typing import Literal, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from craftax.craftax_env import make_craftax_env_from_name
from flax.training.train_state import TrainState
from torch.utils.tensorboard import SummaryWriter
from tqdm.auto import tqdm


@dataclasses.dataclass
class Args:
    exp_name: str = Path(__file__).stem
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment (Python, NumPy, JAX, LLM sampling)"""
    track: bool = False
    """log to Weights & Biases (imported only when set)"""
    wandb_project_name: str = "llm-relabeling"
    """the W&B project name"""
    wandb_entity: Optional[str] = None
    """the W&B entity (team)"""
    save_model: bool = True
    """save a checkpoint (network parameters + instruction buffer) to runs/{run_name}/ at the end"""
    save_every: int = 0
    """also save that checkpoint every this many chunks (0 = only at the end; each save replaces the previous one)"""
    prompts_dir: Optional[str] = None
    """folder holding oir/relabel.md, oir/seed_instructions.md, oir/eval_instructions.md (default: prompts/ here)"""
    total_timesteps: int = 100_000_000
    """total environment steps"""
    num_envs: int = 1024
    """parallel (vmapped) environments (a multiple of 16, the optimistic-reset ratio)"""
    num_steps: int = 16
    """steps per environment per update (the rollout that is relabeled and learned from)"""
    hidden_size: int = 1024
    """width of each hidden layer"""
    num_layers: int = 4
    """hidden layers (Dense -> LayerNorm -> ReLU)"""
    lr: float = 1e-4
    """RAdam learning rate (decays linearly to 0)"""
    gamma: float = 0.99
    """discount factor"""
    q_lambda: float = 0.65
    """lambda of the Q(lambda) returns (choice: purejaxql's Atari/MinAtar value; its Craftax config uses 1 step)"""
    num_minibatches: int = 4
    """minibatches per update (choice; the reference uses 1 with 1024x1 transitions)"""
    chunk_updates: int = 16
    """updates per jitted chunk; the host relabels, logs and evaluates between chunks (raise it to call the LLM less)"""
    embed_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """sentence-transformers model for f_instr and the event texts: hub id or local folder"""
    reward: Literal["semantic", "gt"] = "semantic"
    """semantic: r = 1[cos(f_state, f_instr) > delta] (the paper); gt: the instruction's labelled achievement"""
    delta: float = 0.45
    """cosine threshold of the semantic reward (not published: choice; the paper reports it matters a lot)"""
    buffer_capacity: int = 10
    """B_max, the instruction buffer capacity (paper: 10)"""
    buffer_sampling: Literal["prioritized", "uniform"] = "prioritized"
    """prioritized prefers learning-boundary instructions (paper); uniform is the ablation"""
    relabel: Literal["llm", "template", "none"] = "llm"
    """llm: open-ended LLM relabeling (the paper); template: achievement names as instructions (LLM-free); none: PQN"""
    relabel_k: int = 3
    """K, instructions asked per trajectory (not published: choice)"""
    relabel_trajs: int = 8
    """trajectories sent to the relabeler after each chunk (one request each)"""
    relabel_fraction: float = 0.25
    """relabeled copies per update as a fraction of num_envs (one env's rollout with one achieved instruction)"""
    # --- LLM client (the same seven flags in every script) ------------------------------------------------------------
    llm_backend: Literal["openai", "transformers"] = "openai"
    """openai: any OpenAI-compatible endpoint (`vllm serve`, SGLang, llama.cpp, `transformers serve`, hosted; key from
    $OPENAI_API_KEY); transformers: the model in this process (offline runs with small local models)"""
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
    """evaluate every this many chunks (0 = only at the end)"""
    eval_episodes: int = 16
    """episodes per held-out instruction"""
    eval_max_steps: int = 1000
    """steps per evaluation episode"""


def num_relabel_copies(args: Args) -> int:
    return int(args.relabel_fraction * args.num_envs) if args.relabel != "none" else 0


def check_args(args: Args, prompts: Path) -> None:
    """Every usage error up front, before anything heavy: the first one as one `error: --flag: ...` line."""
    positive = "total_timesteps num_steps hidden_size num_layers lr num_minibatches chunk_updates buffer_capacity "
    positive += "relabel_k relabel_trajs eval_episodes eval_max_steps llm_timeout llm_max_new_tokens llm_concurrency"
    errors = [f"--{name.replace('_', '-')}: must be > 0" for name in positive.split() if getattr(args, name) <= 0]
    rows = args.num_steps * (args.num_envs + num_relabel_copies(args))  # transitions per update, split in minibatches
    rules = [
        (args.num_envs > 0 and args.num_envs % OPTIMISTIC_RESET_RATIO == 0, "--num-envs: must be a multiple of 16"),
        (rows % max(args.num_minibatches, 1) == 0, f"--num-minibatches: must divide {rows} (transitions per update)"),
        (0 <= args.gamma <= 1 and 0 <= args.q_lambda <= 1, "--gamma/--q-lambda: must be in [0, 1]"),
        (-1 < args.delta < 1, "--delta: a cosine threshold, must be in (-1, 1)"),
        (0 <= args.relabel_fraction <= 1, "--relabel-fraction: must be in [0, 1]"),
        (min(args.eval_every, args.save_every) >= 0, "--eval-every/--save-every: must be >= 0"),
    ]
    errors += [msg for ok, msg in rules if not ok]
    files = [prompts / name for name in ("relabel.md", "seed_instructions.md", "eval_instructions.md")]
    errors += [f"--prompts-dir: {path} is missing" for path in files if not path.is_file()]
    if errors:
        raise SystemExit(f"error: {errors[0]}")


# === Environment: Craftax with optimistic resets, and the transition events behind f_state ============================
ENV_ID = "Craftax-Classic-Symbolic-v1"  # the paper's benchmark
OPTIMISTIC_RESET_RATIO = 16  # environments per freshly generated world (the PQN reference's OPTIMISTIC_RESET_RATIO)

# Past-tense event texts for Classic's achievements (f_state's vocabulary, and the lines of the LLM's event log), in its
# Achievement order: index = event id = achievement id.
EVENT_TEXTS = {
    "collect_wood": "collected wood from a tree",
    "place_table": "placed a crafting table",
    "eat_cow": "ate a cow",
    "collect_sapling": "collected a sapling",
    "collect_drink": "drank water",
    "make_wood_pickaxe": "made a wooden pickaxe",
    "make_wood_sword": "made a wooden sword",
    "place_plant": "placed a plant (planted a sapling)",
    "defeat_zombie": "defeated a zombie",
    "collect_stone": "collected stone",
    "place_stone": "placed stone",
    "eat_plant": "ate a ripe plant",
    "defeat_skeleton": "defeated a skeleton",
    "make_stone_pickaxe": "made a stone pickaxe",
    "make_stone_sword": "made a stone sword",
    "wake_up": "woke up after sleeping",
    "place_furnace": "placed a furnace",
    "collect_coal": "collected coal",
    "collect_iron": "collected iron",
    "collect_diamond": "collected a diamond",
    "make_iron_pickaxe": "made an iron pickaxe",
    "make_iron_sword": "made an iron sword",
}

EVENT_NAMES, EVENT_LINES = tuple(EVENT_TEXTS), tuple(EVENT_TEXTS.values())
# Achievement flags fire once per episode; collecting and making show up again as inventory (or drink) increases, so
# an instruction like "collect wood" can be rewarded in every instruction episode (choice; other events fire once).
RECURRING = [(i, n.split("_", 1)[1]) for i, n in enumerate(EVENT_NAMES) if n.startswith(("collect_", "make_"))]


def strong_types(tree):
    # After reset some leaves are weakly typed, after step strongly: without this every jitted function compiles twice.
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, x.dtype), tree)


def transition_events(prev_state, next_state):
    """f_state's input: which events happened in (s_t, s_t+1). Returns bool (..., num_events)."""
    events = next_state.achievements & ~prev_state.achievements  # first unlock in this episode
    for i, field in RECURRING:  # or, for recurring events, an increase since the previous step
        get = lambda s: s.player_drink if field == "drink" else getattr(s.inventory, field)
        events = events.at[..., i].set(events[..., i] | (get(next_state) > get(prev_state)))
    return events


def make_vec_env_step(env, env_params, num_envs: int):
    """Step all envs; envs that end get one of num_envs // 16 fresh worlds (purejaxql's optimistic resets: generating a
    world is the expensive part). Also returns the stepped state before the reset, whose transition gives the events."""
    num_resets = num_envs // OPTIMISTIC_RESET_RATIO

    def step(rng, state, action):
        k_step, k_reset, k_pick = jax.random.split(rng, 3)
        obs_st, state_st, reward, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_step, num_envs), state, action, env_params
        )
        obs_re, state_re = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_resets), env_params)
        reset_idx = jnp.arange(num_resets).repeat(OPTIMISTIC_RESET_RATIO)
        being_reset = jax.random.choice(k_pick, num_envs, (num_resets,), p=done.astype(jnp.float32), replace=False)
        reset_idx = reset_idx.at[being_reset].set(jnp.arange(num_resets))
        pick = lambda fresh, old: jnp.where(done.reshape(-1, *[1] * (old.ndim - 1)), fresh[reset_idx], old)
        state = jax.tree_util.tree_map(pick, strong_types(state_re), state_st)
        return pick(obs_re, obs_st), state, state_st, reward, done

    return step


# === LLM relabeling (paper Section 3): trajectory -> event log -> LLM proposals -> filter -> semantic reward ==========
RELABEL_LOG_LEN = 128  # steps of per-environment history kept on device for the event log (covers >= 8 rollouts of 16)
MAX_LOG_LINES = 30  # the newest event lines sent to the LLM: short prompts, enough for K = 3 proposals
FILTER_MAX_WORDS, FILTER_MAX_CHARS = 12, 80  # instructions are short imperative phrases; longer text is rejected
FILTER_DUP_SIM = 0.95  # cosine above which a proposal is a paraphrase of an instruction already held


def load_prompt(path: Path) -> str:
    """Prompt files: a header, a line that is exactly `---`, then the body (prompts/README.md)."""
    return path.read_text().split("\n---\n", 1)[1]


def read_table(path: Path) -> list:
    """Rows of `a | b | ...` from a prompt-folder data file (body only, # comments skipped)."""
    lines = [line for line in load_prompt(path).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [[part.strip() for part in line.split("|")] for line in lines]


def event_log_text(events: np.ndarray, env_done: np.ndarray) -> str:
    """The trajectory as text for the LLM: one line per step with an event (only the changes, so the log stays short).
    events (L, E) bool, env_done (L,) bool, oldest first."""
    lines = []
    for t in range(len(events)):
        happened = [EVENT_LINES[e] for e in np.flatnonzero(events[t])]
        if happened:
            lines.append(f"step {t}: " + "; ".join(happened))
        if env_done[t]:
            lines.append(f"step {t}: the agent died or the episode ended; a new world began")
    return "\n".join(lines[-MAX_LOG_LINES:]) if lines else "(nothing notable happened)"


_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.):])\s*")
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z0-9 ,'\-]*$")


def parse_proposals(raw: str) -> list:
    """LLM answer -> candidate instructions, one per line. The answer is untrusted text: only parsed, never executed."""
    raw = re.sub(r"<think>.*?(</think>|$)", "", raw, flags=re.DOTALL)  # reasoning models (Qwen3) may think first
    lines = (_BULLET.sub("", line).strip().strip("\"'`").rstrip(".!;:").strip() for line in raw.splitlines())
    return [line for line in lines if line]


def filter_proposals(candidates, k, observed_events, held, embed, delta: float):
    """Rule-based filtering of LLM proposals (the paper's filtering step; the exact rules are our choice): keeps at most
    k candidates that (1) are short, plain text; (2) are not duplicates, textually or semantically, of an instruction
    held, as (text, embedding); (3) are grounded: their best-matching event is above delta and observed in this log.
    Returns (accepted [(text, event id, embedding)], rejection counts by reason)."""
    normalize = lambda text: " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())
    rejected, accepted = Counter(), []
    seen, held = {normalize(t) for t, _ in held}, [emb for _, emb in held]
    for text in candidates:
        if len(accepted) >= k:
            reason = "over_k"
        elif len(text) > FILTER_MAX_CHARS or len(text.split()) > FILTER_MAX_WORDS:
            reason = "too_long"
        elif not _ALLOWED.match(text):
            reason = "bad_chars"
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
            else:
                accepted.append((text, best, emb))
                seen.add(normalize(text))
                held.append(emb)
                continue
        rejected[reason] += 1
    return accepted, rejected


class Embedder:
    """f_instr (and the event texts behind f_state): a sentence encoder on the host, once per new text (cached), never
    per environment step. `events` holds the embedded event vocabulary (E, D)."""

    def __init__(self, model: str, event_texts):
        from sentence_transformers import SentenceTransformer

        try:
            self.model = SentenceTransformer(model, device="cpu")
        except (OSError, ValueError) as e:
            raise SystemExit(f"error: --embed-model {model}: cannot load it ({e})") from None
        self.cache = {}
        self.events = self(list(event_texts))

    def __call__(self, texts) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            embs = self.model.encode(new, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            self.cache.update(zip(new, embs.astype(np.float32)))
        return np.stack([self.cache[t] for t in texts])


def semantic_mask(instr_emb: np.ndarray, event_embs: np.ndarray, delta: float) -> np.ndarray:
    """Which events reward this instruction: cos(f_state, f_instr) > delta (paper) and, our choice, only its best match:
    one threshold is brittle (at 0.45 "make a wooden pickaxe" matches 3 pickaxes, "drink some water" misses its own)."""
    sims = event_embs @ instr_emb  # (E,) cosine: both sides are unit-normalised
    return (sims > delta) & (sims >= sims.max())


def semantic_reward(events, table_mask, slot):
    """r = 1[cos(f_state(s_t, s_t+1), f_instr(i)) > delta] on device, the cosine test done once per instruction on the
    host (semantic_mask): events (..., E) bool, table_mask (B, E) bool, slot (...) int -> (...) bool."""
    return (events & table_mask[slot]).any(-1)


def relabel(llm, prompt: str, ec, buffer, pool, embed, args: Args, rng, tally: Counter):
    """Paper Section 3: propose (one request per trajectory: the event log of the last RELABEL_LOG_LEN steps of a random
    env that saw an event in, K accomplished instructions out; --relabel template: the events' names) -> filter (each
    answer against its own trajectory) -> admit (into the relabel pool and the buffer; a newcomer takes over the running
    episodes of the instruction it evicts)."""
    ring = np.asarray(ec.ring)
    active = np.flatnonzero(ring.any((1, 2)))
    envs = rng.choice(active, min(args.relabel_trajs, len(active)), replace=False)
    events, env_done = ring[envs], np.asarray(ec.ring_done)[envs]
    if args.relabel == "template":
        answers = ["\n".join(EVENT_NAMES[e].replace("_", " ") for e in np.flatnonzero(ev.any(0))) for ev in events]
    else:
        logs = [event_log_text(ev, d) for ev, d in zip(events, env_done)]
        prompts = [Template(prompt).substitute(k=args.relabel_k, trajectory=log) for log in logs]
        answers = llm.chat([[{"role": "user", "content": p}] for p in prompts])
        tally["requests"] += len(answers)
        tally["llm_failures"] = llm.failures
    for answer, ev in zip(answers, events):
        if answer is None:  # a failed request, counted by the client
            continue
        candidates, held = parse_proposals(answer), [(h.text, h.emb) for h in buffer.entries() + list(pool)]
        observed = set(np.flatnonzero(ev.any(0)).tolist())
        accepted, rejected = filter_proposals(candidates, args.relabel_k, observed, held, embed, args.delta)
        tally.update({f"rejected_{r}": c for r, c in rejected.items()}, rejected_empty=not candidates)
        for text, event_id, _ in accepted:
            pool.append(inst := make_instruction(text, event_id, embed, args))
            slot, evicted = buffer.add(inst)
            tally.update(accepted=1, added=slot is not None)
            note = "" if slot is None else f"; buffer slot {slot}" + (f" (evicted {evicted!r})" if evicted else "")
            print(f"relabel: accepted {text!r} (matches event: {EVENT_LINES[event_id]}){note}")


# === Prioritized instruction buffer (statuses, sampling, eviction) and the relabeling pool ============================
# Not published (choices): an instruction needs some episodes before its mean return says anything; old outcomes fade
# so that a status follows the current policy; the learning boundary is sampled most, mastered tasks least.
STATUS_LOW, STATUS_HIGH = 0.1, 0.8  # mean return below: Failing; above: Mastered; between: Learning-boundary
STATUS_MIN_EPISODES = 20
STATUS_WINDOW = 200  # approximate number of recent instruction episodes behind the mean return
STATUS_WEIGHTS = {"failing": 1.0, "boundary": 4.0, "untested": 4.0, "mastered": 0.5}
RELABEL_POOL_SIZE = 32  # recently accepted instructions that relabel rollouts (FIFO, a deque); a few chunks' worth


@dataclasses.dataclass
class Instruction:
    text: str
    emb: np.ndarray  # (D,) unit-norm f_instr
    mask: np.ndarray  # (E,) bool, events that reward it
    successes: float = 0.0
    episodes: float = 0.0

    @property
    def mean_return(self) -> float:
        return self.successes / max(self.episodes, 1e-9)  # an episode's return is 1 (success, the end) or 0


def make_instruction(text: str, event_id, embed: Embedder, args: Args) -> Instruction:
    """f_instr(i) and the events that reward i: by the semantic reward, or (--reward gt) its labelled achievement."""
    emb = embed([text])[0]
    gt = np.arange(len(embed.events)) == event_id
    return Instruction(text, emb, gt if args.reward == "gt" else semantic_mask(emb, embed.events, args.delta))


class InstructionBuffer:
    """Capacity-B_max buffer with Failing / Learning-boundary / Mastered statuses (paper Section 3). Eviction (choice):
    a newcomer replaces the most successful Mastered entry, else the most-tried Failing one, else it is dropped; so
    mastered tasks leave and new ones enter, a curriculum."""

    def __init__(self, args: Args):
        self.uniform, self.slots = args.buffer_sampling == "uniform", [None] * args.buffer_capacity

    def status(self, e: Instruction) -> str:
        if e.episodes < STATUS_MIN_EPISODES:
            return "untested"
        return "failing" if e.mean_return < STATUS_LOW else "mastered" if e.mean_return > STATUS_HIGH else "boundary"

    def probs(self) -> np.ndarray:
        w = [0.0 if e is None else 1.0 if self.uniform else STATUS_WEIGHTS[self.status(e)] for e in self.slots]
        return np.array(w) / sum(w)

    def update(self, successes: np.ndarray, episodes: np.ndarray):
        for e, succ, n in zip(self.slots, successes, episodes):
            if e is not None:
                e.successes, e.episodes = e.successes + float(succ), e.episodes + float(n)
                if e.episodes > STATUS_WINDOW:  # forget old outcomes (approximate sliding window)
                    e.successes, e.episodes = e.successes / 2, e.episodes / 2

    def add(self, entry: Instruction):
        """Returns (slot or None, evicted text or None)."""
        if None in self.slots:
            victim = self.slots.index(None)
        else:
            mastered = [i for i, e in enumerate(self.slots) if self.status(e) == "mastered"]
            failing = [i for i, e in enumerate(self.slots) if self.status(e) == "failing"]
            if not mastered and not failing:
                return None, None
            key = (lambda i: self.slots[i].mean_return) if mastered else (lambda i: self.slots[i].episodes)
            victim = max(mastered or failing, key=key)
        old, self.slots[victim] = self.slots[victim], entry
        return victim, old.text if old else None

    def entries(self) -> list:
        return [e for e in self.slots if e is not None]

    def counts(self) -> dict:
        return {status: sum(self.status(e) == status for e in self.entries()) for status in STATUS_WEIGHTS}


def instruction_arrays(slots: list, num_events: int, dim: int):
    """The device's view of instructions (None = empty slot): embeddings (B, D), event masks (B, E), valid (B,)."""
    emb, mask = np.zeros((len(slots), dim), np.float32), np.zeros((len(slots), num_events), bool)
    for i, e in enumerate(slots):
        if e is not None:
            emb[i], mask[i] = e.emb, e.mask
    return emb, mask, np.array([e is not None for e in slots])


# === LLM client: the same class, flags and errors in all five scripts =================================================
class LLMClient:
    """`chat(conversations) -> [answer or None]` over an OpenAI-compatible endpoint (key from $OPENAI_API_KEY) or an
    in-process transformers model. A request that fails after its retries gives None, counted in `self.failures`: it
    never stops training. Answers are untrusted text, cut to a bounded size; callers validate them, nothing is run."""

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
                    f"error: --llm-base-url {args.llm_base_url}: no OpenAI-compatible server answers "
                    f"({type(e).__name__}); start one (e.g. `vllm serve MODEL`) or use --llm-backend transformers"
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


# === Network: instruction-conditioned Q-network (PQN's LayerNorm MLP) =================================================
class QNetwork(nn.Module):
    """Q(s, ., f_instr(i)): PQN's MLP (Dense -> LayerNorm -> ReLU) x num_layers on [obs, f_instr(i)] (concatenation is
    our choice; the paper states pi(a | s, f_instr(i))), the reference's layer_norm body (no input normalisation)."""

    action_dim: int
    hidden_size: int
    num_layers: int

    @nn.compact
    def __call__(self, obs, instr):
        x = jnp.concatenate([obs, instr], axis=-1)
        for _ in range(self.num_layers):
            x = nn.relu(nn.LayerNorm()(nn.Dense(self.hidden_size)(x)))
        return nn.Dense(self.action_dim)(x)


@flax.struct.dataclass
class EnvCarry:
    env_state: object
    obs: jnp.ndarray  # (N, obs_dim)
    slot: jnp.ndarray  # (N,) buffer slot of the instruction each env follows
    instr_t: jnp.ndarray  # (N,) steps into the current instruction episode
    ring: jnp.ndarray  # (N, L, E) events of the last L steps, oldest first (for the event log)
    ring_done: jnp.ndarray  # (N, L) env episode ended at that step


@flax.struct.dataclass
class Trajectory:
    obs: jnp.ndarray  # (T, N, obs_dim)
    action: jnp.ndarray  # (T, N)
    reward: jnp.ndarray  # (T, N) semantic (or gt) reward of the followed instruction
    done: jnp.ndarray  # (T, N) instruction episode ended (success, timeout or env end)
    env_done: jnp.ndarray  # (T, N)
    events: jnp.ndarray  # (T, N, E)
    slot: jnp.ndarray  # (T, N)
    q_val: jnp.ndarray  # (T, N, A) Q at collection time (for the lambda-returns, as the reference)
    last_obs: jnp.ndarray  # (N, obs_dim) observation after the last step


# === Losses and update ================================================================================================
MAX_GRAD_NORM = 1.0  # global gradient-norm clip, as the reference
EPS_START, EPS_FINISH, EPS_DECAY = 0.1, 0.005, 0.2  # epsilon-greedy, decayed linearly over 20% of the updates
INSTR_MAX_STEPS = 500  # an instruction episode without success ends with return 0 (choice: a fraction of a life)


def lambda_returns(rewards, dones, next_q_max, gamma: float, lam: float):
    """Peng's Q(lambda) targets backwards, as PQN's `_get_target`; rewards, dones, next_q_max (T, B): G_t = r_t +
    gamma (1 - d_t) [(1 - lam) max_a Q(s_t+1, a) + lam G_t+1], G_T-1 bootstrapped from next_q_max[-1]."""

    def body(g_next, x):
        r, d, nq = x
        g = r + gamma * (1.0 - d) * ((1.0 - lam) * nq + lam * g_next)
        return g, g

    last = rewards[-1] + gamma * (1.0 - dones[-1]) * next_q_max[-1]
    _, g = jax.lax.scan(body, last, (rewards[:-1], dones[:-1], next_q_max[:-1]), reverse=True)
    return jnp.concatenate([g, last[None]], axis=0)


def q_loss(params, apply_fn, obs, instr, action, target, weight):
    """PQN's TD loss 0.5 (Q(s, a, i) - G)^2, weighted (relabeled copies without an achieved instruction weigh 0)."""
    q = apply_fn(params, obs, instr)  # (B, A)
    q_a = jnp.take_along_axis(q, action[:, None], axis=-1)[:, 0]  # (B,)
    wsum = jnp.maximum(weight.sum(), 1.0)
    loss = 0.5 * (weight * jnp.square(q_a - target)).sum() / wsum
    return loss, {"losses/td_loss": loss, "losses/q_values": (weight * q_a).sum() / wsum}


def relabel_rollout(traj: Trajectory, pool_emb, pool_mask, pool_valid, num_copies: int, rng):
    """Hindsight relabeling with accepted instructions (paper Section 3): num_copies random envs whose rollout achieved
    a pool instruction, each with one of them, rewards recomputed by its event mask, episodes cut at success. Returns
    the copies' (obs, action, emb, reward, done, env index, valid)."""
    k_env, k_ins = jax.random.split(rng)
    hits = jnp.einsum("tne,pe->np", traj.events.astype(jnp.float32), pool_mask.astype(jnp.float32))
    achieved = (hits > 0) & pool_valid[None]  # (N, P)
    score = achieved.any(-1) + 0.5 * jax.random.uniform(k_env, achieved.shape[:1])
    env_idx = jax.lax.top_k(score, num_copies)[1]  # (R,)
    ach = achieved[env_idx]  # (R, P)
    choice = jnp.argmax(jnp.where(ach, jax.random.uniform(k_ins, ach.shape), -1.0), axis=-1)  # (R,)
    emb, valid = pool_emb[choice], ach.any(-1)  # (R, D), (R,)
    reward = (traj.events[:, env_idx] & pool_mask[choice][None]).any(-1).astype(jnp.float32)  # (T, R)
    done = jnp.maximum(traj.env_done[:, env_idx], reward)  # the relabeled instruction episode ends at success
    return traj.obs[:, env_idx], traj.action[:, env_idx], emb, reward, done, env_idx, valid


def make_learn(network: QNetwork, args: Args, num_copies: int):
    apply_fn = network.apply

    def targets(params, q_val, last_obs, last_instr, reward, done):
        """Q(lambda) targets of a (T, B) rollout from its Q-values at collection and Q at the observation after it."""
        q_next = jnp.concatenate([q_val[1:].max(-1), apply_fn(params, last_obs, last_instr).max(-1)[None]], axis=0)
        return lambda_returns(reward, done, q_next, args.gamma, args.q_lambda)

    def learn(ts: TrainState, traj: Trajectory, table, pool_emb, pool_mask, pool_valid, rng):
        """One pass (the reference's NUM_EPOCHS = 1) over the rollout and its relabeled copies, shuffled minibatches."""
        T, N = traj.action.shape
        k, k_perm = jax.random.split(rng)
        # Instructions travel as indices into a small table (buffer slots, then one row per relabeled copy) and are
        # gathered per minibatch: cheaper than shuffling a (T, N, D) array of embeddings.
        target = targets(ts.params, traj.q_val, traj.last_obs, table[traj.slot[-1]], traj.reward, traj.done)
        data, info = [traj.obs, traj.slot, traj.action, target, jnp.ones((T, N))], {}  # slot (T, N): rows of table
        if num_copies > 0:
            obs, act, emb, rew, done, env, valid = relabel_rollout(traj, pool_emb, pool_mask, pool_valid, num_copies, k)
            # Q of the copies under their new instruction (not available from the rollout): current params.
            q = apply_fn(ts.params, obs, jnp.broadcast_to(emb[None], (T, *emb.shape)))
            target = targets(ts.params, q, traj.last_obs[env], emb, rew, done)
            copy_idx = jnp.broadcast_to(table.shape[0] + jnp.arange(num_copies), (T, num_copies))
            weight = jnp.broadcast_to(valid[None].astype(jnp.float32), (T, num_copies))  # no achieved instruction: 0
            data = [jnp.concatenate(pair, 1) for pair in zip(data, [obs, copy_idx, act, target, weight])]
            table = jnp.concatenate([table, emb], 0)
            info = {"relabel/copies_valid": valid.sum()}
        perm = jax.random.permutation(k_perm, T * data[0].shape[1])
        mbs = [x.reshape(-1, *x.shape[2:])[perm].reshape(args.num_minibatches, -1, *x.shape[2:]) for x in data]

        def minibatch(ts, mb):
            obs, idx, action, target, weight = mb
            grad_fn = jax.value_and_grad(q_loss, has_aux=True)
            (_, minfo), grads = grad_fn(ts.params, apply_fn, obs, table[idx], action, target, weight)
            return ts.apply_gradients(grads=grads), minfo

        ts, minfo = jax.lax.scan(minibatch, ts, mbs)
        return ts, {**info, **{k: v.mean() for k, v in minfo.items()}}

    return learn


def make_train_chunk(network, vec_step, args, num_updates: int):
    """chunk_updates x (collect a rollout, learn on it and its relabeled copies), in one jitted lax.scan. The host
    relabels between chunks: the instructions it accepts relabel the following rollouts (envs that achieve one)."""
    N, learn = args.num_envs, make_learn(network, args, num_relabel_copies(args))
    eps_fn = optax.linear_schedule(EPS_START, EPS_FINISH, max(int(EPS_DECAY * num_updates), 1))  # per update

    def rollout(params, ec: EnvCarry, table_emb, table_mask, slot_logits, eps, rng):
        def step(carry, _):
            ec, rng = carry
            rng, k_a, k_e, k_env, k_slot = jax.random.split(rng, 5)
            q = network.apply(params, ec.obs, table_emb[ec.slot])  # (N, A)
            explore = jax.random.uniform(k_e, (N,)) < eps  # epsilon-greedy (PQN)
            action = jnp.where(explore, jax.random.randint(k_a, (N,), 0, q.shape[-1]), q.argmax(-1))
            obs, env_state, state_st, _, env_done = vec_step(k_env, ec.env_state, action)
            events = transition_events(ec.env_state, state_st)  # (N, E)
            success = semantic_reward(events, table_mask, ec.slot)
            instr_t = ec.instr_t + 1
            idone = env_done | success | (instr_t >= INSTR_MAX_STEPS)
            slot = jnp.where(idone, jax.random.categorical(k_slot, slot_logits, shape=(N,)), ec.slot)  # draw anew
            tr = dict(obs=ec.obs, action=action, reward=success.astype(jnp.float32), done=idone.astype(jnp.float32))
            tr.update(env_done=env_done, events=events, slot=ec.slot, q_val=q)
            ec = ec.replace(env_state=env_state, obs=obs, slot=slot, instr_t=jnp.where(idone, 0, instr_t))
            return (ec, rng), tr

        (ec, _), tr = jax.lax.scan(step, (ec, rng), None, args.num_steps)
        # The rollout's steps enter the event-log history (the last RELABEL_LOG_LEN steps of each env).
        window = lambda old, new: jnp.concatenate([old, new.swapaxes(0, 1)], 1)[:, -RELABEL_LOG_LEN:]
        ec = ec.replace(ring=window(ec.ring, tr["events"]), ring_done=window(ec.ring_done, tr["env_done"]))
        traj = Trajectory(**tr, last_obs=ec.obs)
        per_slot = lambda x: jnp.zeros(table_emb.shape[0]).at[traj.slot].add(x)  # outcomes per buffer slot, (B,)
        return ec, traj, dict(slot_success=per_slot(traj.reward), slot_episodes=per_slot(traj.done))

    @jax.jit
    def train_chunk(ts, ec, rng, table_emb, table_mask, slot_probs, pool):
        def update(carry, _):
            ts, ec, rng = carry
            rng, k_roll, k_learn = jax.random.split(rng, 3)
            eps = eps_fn(ts.step // args.num_minibatches)
            ec, traj, stats = rollout(ts.params, ec, table_emb, table_mask, jnp.log(slot_probs), eps, k_roll)
            ts, info = learn(ts, traj, table_emb, *pool, k_learn)
            return (ts, ec, rng), {**info, **stats, "charts/epsilon": eps}

        (ts, ec, _), infos = jax.lax.scan(update, (ts, ec, rng), None, args.chunk_updates)
        return ts, ec, infos

    return train_chunk


def init_train(env, env_params, network, buffer, embed, args: Args, num_chunks: int, rng):
    """The learner's state (RAdam, clipped, linear decay to 0: the reference's optimiser) and the envs' carry."""
    k_init, k_env, k_slot = jax.random.split(rng, 3)
    N, L, (E, D) = args.num_envs, RELABEL_LOG_LEN, embed.events.shape
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, N), env_params)
    params = network.init(k_init, obs[:1], jnp.zeros((1, D)))
    lr = optax.linear_schedule(args.lr, 1e-20, num_chunks * args.chunk_updates * args.num_minibatches)
    tx = optax.chain(optax.clip_by_global_norm(MAX_GRAD_NORM), optax.radam(learning_rate=lr))
    ts = TrainState.create(apply_fn=network.apply, params=params, tx=tx)
    slot = jax.random.categorical(k_slot, jnp.log(buffer.probs()), shape=(N,))
    ring = jnp.zeros((N, L, E), bool), jnp.zeros((N, L), bool)
    return ts, EnvCarry(strong_types(env_state), obs, slot, jnp.zeros(N, jnp.int32), *ring)


# === Evaluation: held-out instructions, success by ground-truth achievement flags =====================================
EVAL_SUCCESS_THRESHOLD = 0.1  # an instruction counts as covered when its success rate is above this (choice)


def make_evaluate(env, env_params, network, embed: Embedder, path: Path, args: Args):
    """Held-out instructions (kind | text | required achievements), each for eval_episodes greedy episodes (EPS_TEST: 0,
    as the reference) from fresh worlds. Success: every required achievement flag unlocked (ground truth, never the
    semantic reward); coverage: instructions above EVAL_SUCCESS_THRESHOLD, overall and per kind."""
    rows = read_table(path)
    required = np.zeros((len(rows), len(EVENT_NAMES)), bool)
    for i, r in enumerate(rows):
        required[i, [EVENT_NAMES.index(ach.strip()) for ach in r[2].split("+")]] = True
    kinds, texts = np.array([r[0] for r in rows]), [r[1] for r in rows]
    emb, req = (jnp.repeat(jnp.asarray(x), args.eval_episodes, 0) for x in (embed(texts), required))
    n = emb.shape[0]

    @jax.jit
    def evaluate(params, rng):
        rng, k = jax.random.split(rng)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k, n), env_params)

        def step(carry, _):
            obs, state, alive, got, rng = carry
            rng, k = jax.random.split(rng)
            action = network.apply(params, obs, emb).argmax(-1)
            obs2, state2, _, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k, n), state, action, env_params
            )
            got = got | (state2.achievements & alive[:, None])  # ground truth: the environment's achievement flags
            return (obs2, state2, alive & ~done, got, rng), None

        init = (obs, strong_types(state), jnp.ones(n, bool), jnp.zeros_like(req), rng)
        (_, _, _, got, _), _ = jax.lax.scan(step, init, None, args.eval_max_steps)
        return (got | ~req).all(-1).reshape(-1, args.eval_episodes)  # (M, episodes)

    def evaluate_and_log(params, writer, step: int, rng):
        t0 = time.time()
        rates = np.asarray(evaluate(params, rng)).mean(1)
        m = {f"eval/success/{t}": float(r) for t, r in zip(texts, rates)}
        m["eval/coverage"] = int((rates > EVAL_SUCCESS_THRESHOLD).sum())
        for kind in dict.fromkeys(kinds):
            m[f"eval/coverage_{kind}"] = int((rates[kinds == kind] > EVAL_SUCCESS_THRESHOLD).sum())
        m["eval/mean_success"] = float(rates.mean())
        for key, v in m.items():
            writer.add_scalar(key, v, step)
        for kind, text, s in zip(kinds, texts, rates):
            print(f"  eval success {s:5.2f}  [{kind}] {text}")
        print(
            f"eval coverage {m['eval/coverage']}/{len(rates)} (success > {EVAL_SUCCESS_THRESHOLD}) at step {step}, "
            f"mean success {m['eval/mean_success']:.3f} ({time.time() - t0:.1f}s)"
        )

    return evaluate_and_log


def log_chunk(writer, infos: dict, buffer: InstructionBuffer, tally: Counter, chunk: int, step: int, sps, cpu_sps):
    """TensorBoard scalars and the one printed line per chunk."""
    succ, tried = infos["slot_success"].sum(), infos["slot_episodes"].sum()
    scalars = {"charts/SPS": sps, "charts/instruction_success_rate": succ / max(tried, 1)}
    scalars.update({key: v.mean() for key, v in infos.items() if key.startswith(("charts/", "losses/", "relabel/"))})
    scalars.update({f"buffer/{status}": c for status, c in buffer.counts().items()})
    scalars.update({f"relabel/{key}": c for key, c in tally.items()})
    for key, v in scalars.items():
        writer.add_scalar(key, float(v), step)
    print(
        f"chunk {chunk}: step {step}, SPS {sps:.0f} ({cpu_sps:.0f} per CPU-second), td_loss "
        f"{scalars['losses/td_loss']:.4f}, instruction success {succ:.0f}/{tried:.0f}, relabeled copies/update "
        f"{scalars.get('relabel/copies_valid', 0.0):.1f}, buffer {buffer.counts()}"
    )


# === main: rollout -> relabel via the LLM -> filter -> buffer update -> PQN update -> evaluate ========================
def main():
    args = tyro.cli(Args)
    prompts = (Path(args.prompts_dir) if args.prompts_dir else Path(__file__).resolve().parent / "prompts") / "oir"
    check_args(args, prompts)
    llm = LLMClient(args) if args.relabel == "llm" else None  # a wrong --llm-base-url fails here, at start
    steps_per_chunk = args.chunk_updates * args.num_envs * args.num_steps
    num_chunks = max(args.total_timesteps // steps_per_chunk, 1)
    run_name = f"{ENV_ID}__{args.exp_name}__{args.seed}__{int(time.time())}"
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            config=vars(args),
            name=run_name,
            sync_tensorboard=True,
        )
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text(
        "hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items())
    )
    # Seeding: NumPy for the host's choices, JAX for everything on device (and the seed goes with each LLM request).
    np_rng, rng = np.random.default_rng(args.seed), jax.random.PRNGKey(args.seed)

    # auto_reset=False: we reset optimistically ourselves (auto-reset regenerates a world every step, ~10x slower).
    env = make_craftax_env_from_name(ENV_ID, auto_reset=False)
    env_params = env.default_params
    # The method's pieces: the encoder (f_instr and f_state's event texts), the prioritized buffer, the relabel pool.
    embed = Embedder(args.embed_model, EVENT_LINES)
    relabel_prompt = load_prompt(prompts / "relabel.md")
    buffer, pool, tally = InstructionBuffer(args), deque(maxlen=RELABEL_POOL_SIZE), Counter()
    for text, ach in read_table(prompts / "seed_instructions.md"):
        buffer.add(make_instruction(text, EVENT_NAMES.index(ach), embed, args))

    network = QNetwork(env.action_space(env_params).n, args.hidden_size, args.num_layers)
    vec_step = make_vec_env_step(env, env_params, args.num_envs)
    train_chunk = make_train_chunk(network, vec_step, args, num_chunks * args.chunk_updates)
    rng, k = jax.random.split(rng)
    ts, ec = init_train(env, env_params, network, buffer, embed, args, num_chunks, k)
    evaluate_and_log = make_evaluate(env, env_params, network, embed, prompts / "eval_instructions.md", args)
    print(
        f"OIR-PQN on {ENV_ID}: {num_chunks * args.chunk_updates} updates in {num_chunks} chunks, {args.num_envs} "
        f"envs x {args.num_steps} steps, relabel={args.relabel}, reward={args.reward}, sampling={args.buffer_sampling}"
    )
    print("buffer seeds: " + ", ".join(repr(e.text) for e in buffer.entries()))

    for chunk in tqdm(range(num_chunks), desc="chunks"):
        t0, c0, global_step = time.time(), time.process_time(), (chunk + 1) * steps_per_chunk
        rng, k, k_eval = jax.random.split(rng, 3)
        # 1. Rollout + PQN update on it and its relabeled copies, chunk_updates times, in one jitted call.
        table = (*instruction_arrays(buffer.slots, *embed.events.shape)[:2], buffer.probs())
        pool_arrays = instruction_arrays(list(pool) + [None] * (RELABEL_POOL_SIZE - len(pool)), *embed.events.shape)
        ts, ec, infos = train_chunk(ts, ec, k, *table, pool_arrays)
        infos = jax.tree_util.tree_map(np.asarray, infos)
        # 2. Buffer statuses from the instruction episodes that ended.
        buffer.update(infos["slot_success"].sum(0), infos["slot_episodes"].sum(0))
        # 3. Relabel: event logs of recent trajectories -> LLM proposals -> filter -> relabel pool and buffer.
        if args.relabel != "none":
            relabel(llm, relabel_prompt, ec, buffer, pool, embed, args, np_rng, tally)
        # Throughput of the chunk, relabeling included, evaluation excluded (the first chunk also compiles).
        sps = (steps_per_chunk / (time.time() - t0), steps_per_chunk / (time.process_time() - c0))
        log_chunk(writer, infos, buffer, tally, chunk, global_step, *sps)
        # 4. Evaluation and checkpoints.
        due = lambda every: chunk + 1 == num_chunks or (every > 0 and (chunk + 1) % every == 0)
        if due(args.eval_every):
            evaluate_and_log(ts.params, writer, global_step, k_eval)
        if args.save_model and due(args.save_every):  # network (flax msgpack) and buffer, over the previous checkpoint
            out = Path(f"runs/{run_name}")
            (out / "oir_pqn.params").write_bytes(flax.serialization.to_bytes(ts.params))
            keys = ("text", "successes", "episodes")
            rows = [{**{k: getattr(e, k) for k in keys}, "status": buffer.status(e)} for e in buffer.entries()]
            (out / "instruction_buffer.json").write_text(json.dumps(rows, indent=1))
            print(f"checkpoint saved to {out}/oir_pqn.params and {out}/instruction_buffer.json (step {global_step})")

    rejected = {key[len("rejected_") :]: c for key, c in tally.items() if key.startswith("rejected_") and c}
    print(
        f"done: {global_step} env steps, {int(ts.step)} gradient steps, {tally['accepted']} relabeled instructions "
        f"accepted ({tally['requests']} LLM requests, {tally['llm_failures']} failed; rejected: {rejected}), "
        f"{tally['added']} entered the buffer"
    )
    print("final buffer:", "; ".join(f"{e.text!r} [{buffer.status(e)} {e.mean_return:.2f}]" for e in buffer.entries()))
    writer.close()


if __name__ == "__main__":
    main()
