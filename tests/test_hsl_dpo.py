"""Tests of hsl_dpo.py: the DPO loss against TRL's DPOTrainer, ETO pair construction, and smoke runs on real ALFWorld games.

The shared sections (environment, demonstrations, agent, rollouts, relabeling, HSL) are those of hsl_sft.py and are tested
in tests/test_hsl_sft.py; here we test what hsl_dpo.py adds. TRL is a test dependency only (requirements-test.txt):
the script never imports it.
"""

import collections
import copy
import importlib.util
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from runs import run_until_checkpoint, short_eto_prompts, tb_scalars

REPO = Path(__file__).resolve().parents[1]
SCRIPT = "hsl_dpo.py"


@pytest.fixture(scope="module")
def dpo():
    spec = importlib.util.spec_from_file_location("hsl_dpo", REPO / "hsl_dpo.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["hsl_dpo"] = mod
    spec.loader.exec_module(mod)
    torch.set_num_threads(1)
    return mod


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    """(tokenizer, reference model, policy model): the policy is the reference with its weights perturbed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_lm_dir)
    ref = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    policy = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return tok, ref, policy


def traj(room: int, actions: list[str], won: bool = False, thoughts=None) -> dict:
    """A hand-built demonstration / trajectory in the scripts' dict format."""
    return {
        "intro": f"You are in the middle of a room {room}. Looking quickly around you, you see a shelf 1.",
        "instruction": f"put some mug on shelf {room}",
        "actions": actions,
        "observations": [f"You see nothing {k}." for k in range(len(actions))],
        "thoughts": thoughts,
        "z": [1] * len(actions),
        "won": won,
        "gamefile": f"/games/{room}/game.tw-pddl",
        "task_type": "pick_and_place_simple",
    }


def run_dir(out: Path, exp_name: str) -> Path:
    """The one run folder {run_dir}/{exp_name}__{seed}__{time} of a smoke run."""
    (path,) = out.glob(f"{exp_name}__*")
    return path


SYSTEM = [{"role": "user", "content": "Interact with a household to solve a task."}]
SYSTEM.append(
    {"role": "assistant", "content": "OK"}
)  # ETO's conversation prefix (hsl_dpo.agent_prefix)


# ----------------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------------
def test_help(run_script):
    r = run_script("hsl_dpo.py", "--help", timeout=60)
    for flag in (
        "--dpo-iterations",
        "--dpo-beta",
        "--dpo-nll-coef",
        "--dpo-learning-rate",
        "--hsl-steps",
        "--hsl-lambda",
        "--relabeler",
        "--resume",
    ):
        assert flag in r.output


def test_memory_check_rejects_flags_that_cannot_fit(dpo, tiny_lm_dir, monkeypatch, capsys):
    """Issue 25 item 1, shared with hsl_sft.py: micro-batch x sequence length x vocabulary that cannot fit in the device's
    memory is one `error:` line, exit status 2, as soon as load_learner has the agent; the smoke runs' flags pass."""
    args = dpo.Args(
        model_name=str(tiny_lm_dir), micro_batch_size=65536, batch_size=65536, max_seq_len=65536
    )
    agent = dpo.load_agent(args)
    monkeypatch.setattr(dpo, "load_agent", lambda args: agent)
    capsys.readouterr()  # (transformers' loading bar)
    with pytest.raises(SystemExit) as e:
        dpo.load_learner(args, None, [], {}, None, None, None)
    err = capsys.readouterr().err.splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: --micro-batch-size x --max-seq-len: ")
    smoke = dpo.Args(
        model_name=str(tiny_lm_dir), micro_batch_size=2, batch_size=2, max_seq_len=2048
    )
    dpo.check_memory(smoke, agent[1])  # SMOKE's flags: no exit


# ----------------------------------------------------------------------------------------------------------------------
# ETO pair construction
# ----------------------------------------------------------------------------------------------------------------------
def test_build_dpo_pairs_hand_built(dpo, tiny):
    tok = tiny[0]
    demos = [
        traj(
            1,
            [
                "go to countertop 1",
                "take mug 1 from countertop 1",
                "go to shelf 1",
                "move mug 1 to shelf 1",
            ],
            won=True,
            thoughts=["find the mug", None, None, None],
        ),
        traj(2, ["go to shelf 1"], won=True),
    ]
    failed = traj(1, ["go to shelf 1", "look", "go to countertop 1"])
    trajs = [failed, traj(2, ["go to shelf 1"], won=True), traj(3, ["look"]), traj(1, [])]
    counts = collections.Counter()
    pairs = dpo.build_dpo_pairs(trajs, demos, counts)
    assert counts == {
        "pairs_built": 1,
        "pairs_skipped_success": 1,
        "pairs_skipped_no_demo": 1,
        "pairs_skipped_empty": 1,
    }
    assert len(pairs) == 1 and pairs[0]["chosen"] is demos[0] and pairs[0]["rejected"] is failed

    enc = dpo.encode_pair(tok, SYSTEM, pairs[0], 4096)
    c, r = enc["chosen"], enc["rejected"]
    first_c = next(j for j, w in enumerate(c["weights"]) if w > 0)
    first_r = next(j for j, w in enumerate(r["weights"]) if w > 0)
    # same prompt x: system + room description + task, token for token, and nothing of it is trained on
    assert first_c == first_r and c["input_ids"][:first_c] == r["input_ids"][:first_r]
    prompt = tok.decode(c["input_ids"][:first_c])
    assert "Your task is to: put some mug on shelf 1." in prompt and SYSTEM[0]["content"] in prompt

    def action_text(e):
        return tok.decode([i for i, w in zip(e["input_ids"], e["weights"]) if w > 0])

    # only the agent's turns carry weight: y_w is the demonstration, y_l the failure; observations are context only
    assert action_text(c) == (
        "Thought: find the mug\nAction: go to countertop 1<|im_end|>"
        "Action: take mug 1 from countertop 1<|im_end|>Action: go to shelf 1<|im_end|>"
        "Action: move mug 1 to shelf 1<|im_end|>"
    )
    assert (
        action_text(r)
        == "Action: go to shelf 1<|im_end|>Action: look<|im_end|>Action: go to countertop 1<|im_end|>"
    )
    assert "You see nothing 0." in tok.decode(
        r["input_ids"]
    ) and "You see nothing 0." not in action_text(r)
    # the last observation is not part of y (ETO drops a trailing human turn)
    assert "You see nothing 2." not in tok.decode(r["input_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# log-probabilities and the DPO loss
# ----------------------------------------------------------------------------------------------------------------------
def test_sequence_action_logps_matches_slow_loop(dpo, tiny):
    tok, _, policy = tiny
    pair = {
        "chosen": traj(1, ["go to shelf 1", "take mug 1 from shelf 1"]),
        "rejected": traj(1, ["look", "look", "inventory"]),
    }
    enc = dpo.encode_pair(tok, SYSTEM, pair, 4096)
    mb = dpo.pair_batch([enc], tok.pad_token_id, "cpu")
    with torch.no_grad():
        fast, ntok = dpo.sequence_action_logps(
            policy, mb["input_ids"], mb["attention_mask"], mb["weights"]
        )
        for b, e in enumerate([enc["chosen"], enc["rejected"]]):
            ids = torch.tensor([e["input_ids"]])
            logp = torch.log_softmax(policy(input_ids=ids).logits[0].double(), -1)
            slow = sum(
                logp[j - 1, e["input_ids"][j]]
                for j in range(1, len(e["input_ids"]))
                if e["weights"][j] > 0
            )
            assert abs(fast[b].item() - slow.item()) < 1e-3 * max(1.0, abs(slow.item()))
            assert ntok[b].item() == sum(w > 0 for w in e["weights"][1:])


@pytest.mark.parametrize("nll_coef", [0.0, 0.5])
def test_dpo_loss_matches_trl(dpo, tiny, nll_coef, tmp_path):
    """Same tiny model, same token batch: our loss equals TRL 1.16 DPOTrainer's (loss_type sigmoid, + "sft" for the NLL)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tok, ref, policy = tiny
    # single-turn pairs, so that TRL's completion (everything after the prompt) is exactly the agent's action tokens
    pairs = [
        {"chosen": traj(k, [f"go to shelf {k}"]), "rejected": traj(k, ["look" * (k + 1)])}
        for k in range(3)
    ]
    enc = [dpo.encode_pair(tok, SYSTEM, p, 4096) for p in pairs]
    B = len(enc)
    mb = dpo.pair_batch(enc, tok.pad_token_id, "cpu")
    dpo.reference_logps(ref, enc, 2, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logps, ntok = dpo.sequence_action_logps(
            policy, mb["input_ids"], mb["attention_mask"], mb["weights"]
        )
    ref_c = torch.tensor([e["ref_chosen"] for e in enc])
    ref_r = torch.tensor([e["ref_rejected"] for e in enc])
    ours, info = dpo.dpo_loss(
        logps[:B], logps[B:], ref_c, ref_r, 0.1, nll_coef, B, float(ntok[:B].sum())
    )

    def split(e):
        nz = [j for j, w in enumerate(e["weights"]) if w > 0]
        assert nz == list(range(nz[0], nz[-1] + 1))  # one contiguous action span
        return e["input_ids"][: nz[0]], e["input_ids"][nz[0] : nz[-1] + 1]

    examples = []
    for e in enc:
        (pc, yc), (pr, yr) = split(e["chosen"]), split(e["rejected"])
        assert pc == pr
        examples.append({"prompt_ids": pc, "chosen_ids": yc, "rejected_ids": yr})
    # bf16=False: TRL otherwise runs the reference model under bf16 autocast on CPUs that support it
    cfg = DPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        beta=0.1,
        per_device_train_batch_size=B,
        use_cpu=True,
        bf16=False,
        max_length=None,
        loss_type=["sigmoid", "sft"] if nll_coef else ["sigmoid"],
        loss_weights=[1.0, nll_coef] if nll_coef else None,
    )
    trainer = DPOTrainer(
        model=copy.deepcopy(policy),
        ref_model=copy.deepcopy(ref),
        args=cfg,
        processing_class=tok,
        train_dataset=Dataset.from_list([{"prompt": "x", "chosen": "y", "rejected": "z"}]),
    )
    trainer.model.eval()
    with torch.no_grad():
        theirs = trainer.compute_loss(trainer.model, trainer.data_collator(examples))
    assert abs(ours.item() - theirs.item()) < 1e-5, (ours.item(), theirs.item())
    assert (
        abs(ours.item() - 0.6931) > 1e-3
    )  # the policy differs from the reference: not the trivial log 2


def test_accumulated_micro_batches_equal_one_batch(dpo, tiny):
    """Gradient accumulation over micro-batches gives the full batch's loss and gradient (NLL term included)."""
    from accelerate import Accelerator

    tok, ref, policy = tiny
    pairs = [
        {
            "chosen": traj(k, ["go to shelf 1", f"take mug {k} from shelf 1"]),
            "rejected": traj(k, ["look"] * (k + 1)),
        }
        for k in range(3)
    ]
    enc = [dpo.encode_pair(tok, SYSTEM, p, 4096) for p in pairs]
    dpo.reference_logps(ref, enc, 3, tok.pad_token_id, "cpu")
    grads, losses = [], []
    for micro in (3, 1):
        model = copy.deepcopy(policy)
        info = dpo.accumulate_dpo_loss(
            model, enc, 0.1, 0.3, micro, Accelerator(cpu=True), tok.pad_token_id
        )
        losses.append(info["dpo/total_loss"])
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert abs(losses[0] - losses[1]) < 1e-5
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4) and grads[0].abs().sum() > 0


def test_dpo_steps_raise_the_preference_margin(dpo, tiny):
    """A few optimisation steps of the loss make the policy prefer y_w over y_l more than the reference does."""
    from accelerate import Accelerator

    tok, ref, _ = tiny
    model = copy.deepcopy(ref).train()
    pairs = [
        {"chosen": traj(k, ["go to shelf 1"]), "rejected": traj(k, ["inventory"])} for k in range(2)
    ]
    enc = [dpo.encode_pair(tok, SYSTEM, p, 4096) for p in pairs]
    dpo.reference_logps(model, enc, 2, tok.pad_token_id, "cpu")  # pi_ref = the starting policy
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = None
    for _ in range(5):
        info = dpo.accumulate_dpo_loss(
            model, enc, 0.1, 0.0, 2, Accelerator(cpu=True), tok.pad_token_id
        )
        first = info if first is None else first
        opt.step()
        opt.zero_grad()
    assert (
        abs(first["dpo/loss"] - 0.693147) < 1e-4 and abs(first["dpo/reward_margin"]) < 1e-6
    )  # policy == reference
    assert (
        info["dpo/reward_margin"] > 0.05
        and info["dpo/loss"] < first["dpo/loss"]
        and info["dpo/reward_accuracy"] == 1.0
    )


# ----------------------------------------------------------------------------------------------------------------------
# Smoke runs (end to end, as a user runs the script)
# ----------------------------------------------------------------------------------------------------------------------
def any_goal(messages) -> str:
    """Scripted relabeler (tests/support/scripted_llm.py) that fills D' from any trajectory of the put games: Figure 8
    names "put a mug in <the first receptacle the trajectory mentions>" (every put train game holds a mug, and the
    room description names only receptacles: a goal that passes the type check against the game's facts), reached at
    step 1; Figure 9: every step relevant."""
    text = messages[1]["content"]
    steps = len(re.findall(r"^Step \d+:", text, re.M))
    if "goal-inference" not in messages[0]["content"]:
        return json.dumps([{"step": k + 1, "is_relevant_to_goal": "yes"} for k in range(steps)])
    recep = re.findall(r"\b([a-z]+) \d+\b", text)[0]
    return json.dumps(
        [{"step": k + 1, "reached_goals": [f"put a mug in {recep}"]} for k in range(steps)]
    )


def scripted_relabeler(server) -> list:
    server.respond = any_goal
    return [
        "--relabeler",
        "llm",
        "--llm-backend",
        "openai",
        "--llm-base-url",
        server.base_url,
        "--llm-model",
        "scripted",
    ]


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
    "--rollouts-per-step",
    "4",
    "--max-env-steps",
    "12",
    "--learning-rate",
    "1e-3",
    "--max-seq-len",
    "2048",
    "--agent-max-new-tokens",  # the tiny random model never stops early: the cap the suite had before ETO's 512
    "64",
    "--eval-every",
    "0",
    "--dpo-batch-size",
    "2",
    "--dpo-epochs",
    "1",
    "--dpo-learning-rate",
    "1e-4",
    "--seed",
    "1",
]
EVAL = r"\[eval after {}\] step \d+ .*valid_seen/success ([0-9.]+).*valid_unseen/success ([0-9.]+)"


def test_smoke_sft_hsl_dpo(run_script, put_games, tiny_lm_dir, scripted_llm, tmp_path):
    out = tmp_path / "runs"
    r = run_script(
        "hsl_dpo.py",
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        "--hsl-steps",
        "2",
        "--dpo-iterations",
        "1",
        "--run-dir",
        out,
        "--exp-name",
        "dpo_hsl",
        *SMOKE,
        *scripted_relabeler(scripted_llm),
        timeout=600,
    )
    assert re.search(r"\[sft\] step 1/1 loss [0-9.]+", r.output)
    assert re.search(r"\[hsl\] step 2/2 .*loss [0-9.]+", r.output)
    m = re.search(r"\[eto\] iteration 1/1: explored (\d+) train tasks .* -> (\d+) pairs", r.output)
    assert m and int(m.group(1)) == 2 and int(m.group(2)) >= 1, r.output[-3000:]
    assert re.search(
        r"\[dpo\] iteration 1 step 1/\d+ loss [0-9.]+ reward acc [0-9.]+ margin -?[0-9.]+", r.output
    )
    for phase in ("sft", "hsl", "dpo"):  # the three evaluations: SFT, SFT+HSL, DPO+HSL
        assert re.search(EVAL.format(phase), r.output), phase
    assert re.search(r"\[results\] SFT +\| [0-9.]+ \| [0-9.]+", r.output)
    assert re.search(r"\[results\] SFT\+HSL +\| [0-9.]+ \| [0-9.]+", r.output)
    assert re.search(r"\[results\] DPO\+HSL +\| [0-9.]+ \| [0-9.]+", r.output)
    summary = json.loads((run_dir(out, "dpo_hsl") / "summary.json").read_text())
    assert summary["pairs_built"] >= 1 and summary["dpo_steps"] >= 1 and summary["evaluations"] == 3
    assert list(summary["results"]) == ["SFT", "SFT+HSL", "DPO+HSL"]
    assert summary["hsl_steps"] == 2 and summary["relabeled_pushed"] >= 1
    assert (run_dir(out, "dpo_hsl") / "checkpoints" / "dpo_iter_1" / "model.safetensors").exists()
    assert list(run_dir(out, "dpo_hsl").glob("events.out.tfevents.*"))


def test_resume_after_sigkill_continues_exactly(
    run_script, put_games, tiny_lm_dir, scripted_llm, tmp_path
):
    """Issue 12 part 4: SFT, 2 HSL steps and an ETO round in one run, and a run killed with SIGKILL right after its
    step-1 HSL checkpoint then resumed, give the same per-step HSL and DPO losses (TensorBoard, bit for bit), the same
    pairs and the same final state (D', counters, the results of every phase)."""
    scripted_llm.respond = any_goal
    out = tmp_path / "runs"
    flags = [
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        *scripted_relabeler(scripted_llm),
        *SMOKE,
    ]
    flags += [
        "--hsl-steps",
        "2",
        "--eval-every",
        "1",
        "--dpo-iterations",
        "1",
        "--max-env-steps",
        "6",
    ]
    flags += ["--rollouts-per-step", "2", "--run-dir", out]
    whole = run_script(SCRIPT, *flags, "--exp-name", "whole", timeout=600).output
    ckpt, _ = run_until_checkpoint(SCRIPT, flags, out, "killed", "hsl_1")
    resumed = run_script(
        SCRIPT, *flags, "--exp-name", "resumed", "--resume", ckpt, timeout=600
    ).output
    assert (
        "[hsl] step 1/2" not in resumed
        and "[hsl] step 2/2" in resumed
        and "[eto] iteration 1/1" in resumed
        and "[sft] step" not in resumed
    )
    # the evaluation after SFT ran before the kill: its results come back from the checkpoint
    assert re.search(r"\[results\] SFT +\| [0-9.]+ \| [0-9.]+", resumed)
    eto = lambda text: re.search(
        r"\[eto\] iteration 1/1: explored .*? in [0-9.]+s (.*)$", text, re.M
    ).group(1)
    assert eto(resumed) == eto(whole)  # the same exploration outcome and pairs
    a, b = run_dir(out, "whole"), run_dir(out, "resumed")
    for tag, n in (
        ("losses/hsl_total", 1),
        ("hsl/loss", 1),
        ("dpo/total_loss", 0),
        ("dpo/reward_margin", 0),
    ):
        whole_values = tb_scalars(a, tag)
        assert whole_values and tb_scalars(b, tag) == whole_values[n:], tag
    final = [
        json.loads((d / "checkpoints" / "final" / "hsl_state.json").read_text()) for d in (a, b)
    ]
    assert final[0]["buffer"] and final[0]["dpo_steps"] >= 1 and final[0] == final[1]


def test_smoke_eto_baseline_without_hsl(run_script, put_games, tiny_lm_dir, tmp_path):
    """--hsl-steps 0: the plain DPO (ETO) baseline from the same file: SFT, then ETO rounds."""
    out = tmp_path / "runs"
    r = run_script(
        "hsl_dpo.py",
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        "--hsl-steps",
        "0",
        "--dpo-iterations",
        "1",
        "--dpo-nll-coef",
        "0.2",
        "--run-dir",
        out,
        "--exp-name",
        "eto",
        *SMOKE,
        "--relabeler",
        "oracle",
        timeout=600,
    )
    assert "[hsl] step" not in r.output and not re.search(EVAL.format("hsl"), r.output)
    assert re.search(r"\[eto\] iteration 1/1: .* -> [1-9]\d* pairs", r.output)
    assert re.search(EVAL.format("sft"), r.output) and re.search(EVAL.format("dpo"), r.output)
    summary = json.loads((run_dir(out, "eto") / "summary.json").read_text())
    assert (
        list(summary["results"]) == ["SFT", "DPO"]
        and summary["dpo_steps"] >= 1
        and summary["hsl_steps"] == 0
    )


def test_data_parallel_two_processes_match_one(
    run_script, put_games, tiny_lm_dir, scripted_llm, tmp_path
):
    """SFT -> ETO/DPO with 2 CPU processes (gloo; `accelerate launch` on GPUs) gives the weights 1 process gives:
    greedy exploration is split over the processes and gathered in order, and each DPO batch is split over them."""
    from safetensors.torch import load_file

    out = tmp_path / "runs"
    common = [
        *SMOKE,
        *scripted_relabeler(scripted_llm),
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        "--hsl-steps",
        "0",
        "--dpo-iterations",
        "2",
        "--dpo-learning-rate",
        "1e-3",
        "--dpo-later-learning-rate",
        "1e-3",
        "--dpo-epochs",
        "3",
        "--micro-batch-size",
        "1",
        "--run-dir",
        out,
    ]  # later flags win
    # micro-batches of one example on both sides: the only difference left is the order of the gradient sum (with
    # larger micro-batches padding changes the float sums, and AdamW turns that noise in near-zero gradients into
    # learning-rate-sized steps)
    one = run_script("hsl_dpo.py", *common, "--exp-name", "one", timeout=600)
    two = run_script("hsl_dpo.py", *common, "--exp-name", "two", processes=2, timeout=600)
    assert "[accelerate] 2 processes; model and D' identical on all: True" in two.output, (
        two.output[-3000:]
    )
    dpo_lines = lambda o: re.findall(
        r"\[dpo\] iteration \d step \d/\d loss ([0-9.]+) reward acc ([0-9.]+)", o
    )
    assert dpo_lines(one.output) == dpo_lines(two.output) and len(dpo_lines(one.output)) == 6
    weights = lambda run, ckpt: load_file(
        str(run_dir(out, run) / "checkpoints" / ckpt / "model.safetensors")
    )
    a, b, sft = weights("one", "final"), weights("two", "final"), weights("one", "sft")
    assert max((a[k] - sft[k]).abs().max().item() for k in a) > 1e-4  # DPO moved the weights ...
    # ... the same way with one process and with two, bit for bit: every run uses one thread (conftest.run_script), and
    # the two processes' gradients of one-example micro-batches add up in the order one process adds them (0.0 measured;
    # with 2 threads in the one-process run it was 1e-4: AdamW turns last-bit noise in near-zero gradients into steps)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_dpo_loss_stops_before_the_round_checkpoint(
    dpo, monkeypatch, put_games, tiny_lm_dir, tmp_path
):
    """Issue 25 item 4: a NaN DPO loss stops the run at that step with one line, before the update, and the round's
    checkpoint (dpo_iter_1) is never written. In this process: main() with a command line, a one-step round."""
    dpo_loss = dpo.dpo_loss

    def nan_loss(*args):
        loss, info = dpo_loss(*args)
        return loss * float("nan"), {**info, "dpo/loss": math.nan}

    monkeypatch.setattr(dpo, "dpo_loss", nan_loss)
    out = tmp_path / "runs"
    argv = [
        "--data-dir",
        put_games,
        "--model-name",
        tiny_lm_dir,
        "--relabeler",
        "oracle",
        "--run-dir",
        out,
    ]
    argv += [*SMOKE, "--hsl-steps", "0", "--dpo-iterations", "1", "--max-env-steps", "1"]
    argv += ["--agent-max-new-tokens", "4", "--dpo-batch-size", "4"]
    monkeypatch.setattr(sys, "argv", [SCRIPT, *map(str, argv)])
    with pytest.raises(SystemExit) as e:
        dpo.main()
    assert re.fullmatch(
        r"error: step 1: loss is nan \(gradient norm nan\); stopped .*", e.value.code
    ), e.value
    (run,) = out.iterdir()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["sft"]
