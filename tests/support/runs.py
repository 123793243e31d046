"""Helpers of the resume tests of hsl_sft.py / hsl_dpo.py (issue 12 part 4): kill a run with SIGKILL as soon as a
checkpoint is complete, and read the per-step scalars a run wrote to TensorBoard."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run_until_checkpoint(
    script: str, args: list, out: Path, exp_name: str, checkpoint: str, timeout: float = 600
):
    """Start `python script args --exp-name exp_name` and SIGKILL it once {out}/{exp_name}__*/checkpoints/{checkpoint}
    exists (the scripts rename a finished checkpoint into place); returns (checkpoint folder, what the run printed)."""
    log = out.parent / f"{exp_name}.log"
    cmd = [sys.executable, str(REPO / script), *map(str, args), "--exp-name", exp_name]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        start, found = time.time(), []
        while not found and proc.poll() is None and time.time() - start < timeout:
            time.sleep(0.1)
            found = list(out.glob(f"{exp_name}__*/checkpoints/{checkpoint}"))
        os.kill(proc.pid, signal.SIGKILL)  # (a no-op on a process that already ended)
        proc.wait()
    assert found and proc.returncode == -signal.SIGKILL, log.read_text()[-3000:]
    return found[0], log.read_text()


def tb_scalars(run: Path, tag: str) -> list[float]:
    """The values of one scalar tag of a run's TensorBoard events, in the order they were written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def short_eto_prompts() -> str:
    """A folder in ETO's eval_agent/prompt layout (for --eto-prompts) with a one-line instruction and a one-action
    example: keeps the smoke runs' sequences short for the tests' byte-level tiny tokenizer, for which the full prompt
    (prompts/hsl/alfworld_agent.md + alfworld_icl.md) is about 2,300 tokens."""
    import json
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="eto_prompts_"))
    (folder / "instructions").mkdir()
    (folder / "icl_examples").mkdir()
    (folder / "instructions" / "alfworld_inst.txt").write_text(
        'Act in the house. Answer "Thought: ...\\nAction: ...".'
    )
    turns = [
        {"role": "user", "content": "A room.\n\nYour task is to: look."},
        {"role": "assistant", "content": "Action: look"},
    ]
    (folder / "icl_examples" / "alfworld_icl.json").write_text(json.dumps([turns]))
    return str(folder)
