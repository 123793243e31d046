"""End-to-end tests of hsl_sft.py, run as a user runs it: smoke runs, exact resume after SIGKILL, data parallelism.

The games come from tests/support/alfworld_games.py (real ALFWorld PDDL games written from what the alfworld wheel
ships). Smoke runs use the tiny random LM as the agent (it writes gibberish: no goal of its own is ever achieved) and a
scripted OpenAI-compatible relabeler (tests/support/alfworld_answers.py: deterministic Figure 8/9 answers that name
entities of the trajectory, so D' fills from any trajectory), or SmolLM2-135M-Instruct (transformers backend, plumbing
only). Unit tests of the method's pieces: tests/test_hsl_sft.py.
"""

import json
import math
import re
from pathlib import Path

from alfworld_answers import any_goal, figure8, is_goal_inference, scripted_relabeler
from runs import run_until_checkpoint, short_eto_prompts, tb_scalars

# `scripted_llm` (a scripted OpenAI-compatible server on 127.0.0.1) comes from conftest.py.

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "hsl_sft.py"


def run_dir(out: Path, exp_name: str) -> Path:
    """The one run folder {run_dir}/{exp_name}__{seed}__{time} of a smoke run."""
    (path,) = out.glob(f"{exp_name}__*")
    return path


# ----------------------------------------------------------------------------------------------------------------------
# Smoke runs (end to end, as a user runs the script)
# ----------------------------------------------------------------------------------------------------------------------
def mug_goal(messages) -> str:
    """A scripted relabeler that fills D' from any trajectory on the put games: `any_goal` (tests/support), but its
    Figure 8 goal passes the type check against the game's facts: "put a mug in <the first receptacle the trajectory
    mentions>" (every put train game holds a mug; the room description names only receptacles)."""
    if not is_goal_inference(messages):
        return any_goal(messages)
    text = messages[1]["content"]
    steps = len(re.findall(r"^Step \d+:", text, re.M))
    recep = re.findall(r"\b([a-z]+) \d+\b", text)[0]
    return figure8({1: [f"put a mug in {recep}"]}, steps)


SMOKE = [
    "--eto-prompts",  # ETO's prompt layout, a few tokens: short sequences for the byte-level tiny tokenizer
    short_eto_prompts(),
    "--num-demos",
    "2",
    "--batch-size",
    "2",
    "--micro-batch-size",
    "2",
    "--sft-epochs",
    "1",
    "--max-env-steps",
    "12",
    "--learning-rate",
    "1e-3",
    "--max-seq-len",
    "2048",
    "--agent-max-new-tokens",  # the tiny random model never stops early: the cap the suite had before ETO's 512
    "64",
]


def test_smoke_hsl(run_script, put_games, tiny_lm_dir, scripted_llm, tmp_path):
    """SFT, evaluation, HSL steps whose relabeled demos fill D' and train through L_D', checkpoints (resuming from
    one: test_resume_after_sigkill_continues_exactly)."""
    scripted_llm.respond = mug_goal
    out = tmp_path / "runs"
    r = run_script(
        "hsl_sft.py",
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        *scripted_relabeler(scripted_llm),
        "--hsl-steps",
        "3",
        "--rollouts-per-step",
        "4",
        "--eval-every",
        "2",
        "--run-dir",
        out,
        "--exp-name",
        "hsl",
        "--seed",
        "1",
        *SMOKE,
        timeout=600,
    )
    assert re.search(r"\[sft\] step 1/1 loss [0-9.]+", r.output)
    assert (
        len(
            re.findall(
                r"\[eval [a-z ]+\] step \d+ .*valid_seen/success [0-9.]+.*valid_unseen/success",
                r.output,
            )
        )
        == 3
    )
    pushes = [int(x) for x in re.findall(r"relabeled \+(\d+) buffer", r.output)]
    assert len(pushes) == 3 and sum(pushes) >= 1, r.output[-3000:]
    assert re.search(r"\(L_D' [0-9.]+, L_SFT [0-9.]+\)", r.output), (
        "no HSL gradient step with a non-empty D'"
    )
    summary = json.loads((run_dir(out, "hsl") / "summary.json").read_text())
    assert (
        summary["hsl_steps"] == 3
        and summary["relabeled_pushed"] >= 1
        and summary["evaluations"] == 3
    )
    assert (run_dir(out, "hsl") / "checkpoints" / "final" / "model.safetensors").exists()
    assert list(run_dir(out, "hsl").glob("events.out.tfevents.*"))
    c = summary[
        "counters"
    ]  # every trajectory went through Figure 8, every goal through Figure 9, nothing skipped
    assert c["goal_inference_calls"] == 12 and c["relevance_calls"] == c["goals_found"] == 12
    assert not any(
        k in c for k in ("goal_inference_bad_json", "goal_invalid", "relevance_unusable")
    )
    assert (
        summary["precision_vs_oracle"] == 0.0
    )  # the scripted goals are no goals the oracle saw achieved


def test_resume_after_sigkill_continues_exactly(
    run_script, put_games, tiny_lm_dir, scripted_llm, tmp_path
):
    """Issue 12 part 4: 3 HSL steps in one run, and a run killed with SIGKILL right after its step-1 checkpoint then
    resumed to step 3, give the same per-step losses (TensorBoard, bit for bit), the same games and pushes, and the
    same final D' and counters: every generator (games picked, agent sampling, D' batches, SFT order) continues."""
    scripted_llm.respond = (
        mug_goal  # D' fills from any trajectory, so D' sampling is part of every step
    )
    out = tmp_path / "runs"
    flags = [
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        *scripted_relabeler(scripted_llm),
        *SMOKE,
    ]
    flags += ["--hsl-steps", "3", "--rollouts-per-step", "2", "--eval-every", "1"]
    flags += ["--max-env-steps", "6"]
    flags += ["--run-dir", out, "--seed", "3"]
    whole = run_script(SCRIPT, *flags, "--exp-name", "whole", timeout=600).output
    ckpt, killed = run_until_checkpoint(SCRIPT, flags, out, "killed", "hsl_1")
    resumed = run_script(
        SCRIPT, *flags, "--exp-name", "resumed", "--resume", ckpt, timeout=600
    ).output
    assert "[hsl] step 1/3" not in resumed and "[hsl] step 3/3" in resumed
    assert "[sft] step" not in resumed  # SFT ended before the checkpoint: it does not run again
    assert re.search(
        rf"\[resume\] {re.escape(str(ckpt))}: sft_steps 1, hsl_steps 1, D' \d+", resumed
    )
    step = lambda text, k: re.search(
        rf"\[hsl\] step {k}/3 \| .*? \| (success .*)$", text, re.M
    ).group(1)
    assert step(killed, 1) == step(whole, 1)  # (the progress line without its timings)
    assert [step(resumed, k) for k in (2, 3)] == [step(whole, k) for k in (2, 3)]
    a, b = run_dir(out, "whole"), run_dir(out, "resumed")
    for tag in (
        "losses/hsl_total",
        "hsl/loss",
        "losses/grad_norm",
        "charts/learning_rate",
        "buffer/size",
    ):
        assert tb_scalars(b, tag) == tb_scalars(a, tag)[-2:] and len(tb_scalars(a, tag)) >= 3, tag
    final = [
        json.loads((d / "checkpoints" / "final" / "hsl_state.json").read_text()) for d in (a, b)
    ]
    assert (
        final[0]["buffer"] and final[0] == final[1]
    )  # D' (demos, weights, order), counters, steps, evaluations


def test_smoke_llm_relabeler_smollm2(run_script, put_games, tiny_lm_dir, smollm2_dir, tmp_path):
    out = tmp_path / "runs"
    r = run_script(
        "hsl_sft.py",
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        "--relabeler",
        "llm",
        "--llm-backend",
        "transformers",
        "--llm-model",
        smollm2_dir,
        "--llm-max-new-tokens",
        "24",
        "--hsl-steps",
        "1",
        "--rollouts-per-step",
        "2",
        "--eval-every",
        "0",
        "--run-dir",
        out,
        "--exp-name",
        "llm",
        *SMOKE,
        timeout=600,
    )
    assert re.search(
        r"\[hsl\] step 1/1 .*loss [0-9.]+.*precision (nan|[0-9.]+) recall (nan|[0-9.]+)", r.output
    )
    assert re.search(r"\[eval final\] step 1 .*valid_seen/success [0-9.]+", r.output)
    summary = json.loads((run_dir(out, "llm") / "summary.json").read_text())
    c = summary["counters"]
    assert c["goal_inference_calls"] == 2  # every trajectory went through the LLM (Figure 8 prompt)
    # whatever SmolLM2 answered was either turned into validated goals or counted as a skip
    assert (
        c.get("goals_found", 0)
        + c.get("goal_inference_bad_json", 0)
        + c.get("goal_invalid", 0)
        + c.get("trajectories_without_goal", 0)
        >= 2
    )
    assert summary["hsl_steps"] == 1 and summary["evaluations"] == 1
    assert (
        summary["recall_vs_oracle"] is None
        or math.isnan(summary["recall_vs_oracle"])
        or 0 <= summary["recall_vs_oracle"] <= 1
    )


def load_weights(path: Path, ckpt: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "checkpoints" / ckpt / "model.safetensors"))


def test_data_parallel_two_processes(run_script, put_games, tiny_lm_dir, scripted_llm, tmp_path):
    """Multi-process training through accelerate (run here on 2 CPU processes with gloo, as `accelerate launch` runs it
    on GPUs): every process takes its share of each global batch, so SFT gives the weights one process gives; the HSL
    loop (uneven shares: 3 rollouts and batches of 3 over 2 processes) ends with the same model and D' on both."""
    scripted_llm.respond = mug_goal  # both processes relabel through the same scripted server
    out = tmp_path / "runs"
    common = [
        "--eto-prompts",
        short_eto_prompts(),
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        *scripted_relabeler(scripted_llm),
        "--num-demos",
        "2",
        "--batch-size",
        "3",
        "--micro-batch-size",
        "1",
        "--sft-epochs",
        "3",
        "--rollouts-per-step",
        "3",
        "--max-env-steps",
        "12",
        "--learning-rate",
        "1e-3",
        "--max-seq-len",
        "2048",
        "--agent-max-new-tokens",
        "64",
        "--eval-every",
        "0",
        "--run-dir",
        out,
        "--seed",
        "1",
    ]
    one = run_script("hsl_sft.py", *common, "--hsl-steps", "0", "--exp-name", "one", timeout=600)
    two = run_script(
        "hsl_sft.py", *common, "--hsl-steps", "3", "--exp-name", "two", processes=2, timeout=600
    )
    assert "[accelerate] 2 processes; model and D' identical on all: True" in two.output, (
        two.output[-3000:]
    )
    assert (
        len(re.findall(r"^\[hsl\] step \d/3 ", two.output, re.M)) == 3
    )  # printed by the main process only
    sft_losses = lambda out: re.findall(r"\[sft\] step \d/\d loss ([0-9.]+)", out)
    assert sft_losses(one.output) == sft_losses(two.output) and len(sft_losses(one.output)) == 3
    a, b = load_weights(run_dir(out, "one"), "sft"), load_weights(run_dir(out, "two"), "sft")
    from safetensors.torch import load_file

    init = load_file(str(Path(tiny_lm_dir) / "model.safetensors"))
    assert max((a[k] - init[k]).abs().max().item() for k in a) > 1e-3  # SFT moved the weights ...
    assert (
        max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    )  # ... the same way with one process and with two
    summary = json.loads((run_dir(out, "two") / "summary.json").read_text())
    assert (
        summary["hsl_steps"] == 3 and summary["evaluations"] == 1 and summary["buffer_size"] > 0
    )  # a non-empty D'
    assert "(D' empty" not in two.output.split("[hsl] step 3/3")[1].split("\n")[0]
