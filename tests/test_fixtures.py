"""The fixtures' own tests: both language models really generate text, the tokenizer masks assistant tokens,
the sentence encoder embeds, and the script runner reports what a process printed and how it exited."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

torch.set_num_threads(1)


def _generate(model_dir, messages, max_new_tokens):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, ids["input_ids"].shape[1] :]
    return tok, new, tok.decode(new, skip_special_tokens=True)


def test_tiny_lm_generates_and_masks(tiny_lm_dir):
    tok, new, _ = _generate(
        tiny_lm_dir, [{"role": "user", "content": "go to desk 1"}], max_new_tokens=8
    )
    assert tok.is_fast
    assert 1 <= new.numel() <= 8
    # Round trip through the byte-level tokenizer is lossless.
    text = "Action: move mug 1 to shelf 2 — ok"
    assert tok.decode(tok(text)["input_ids"]) == text
    # The chat template marks exactly the assistant turn (content + end token) for the loss.
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Action: look"}]
    enc = tok.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"]) if m]
    assert tok.decode(masked) == "Action: look<|im_end|>"


def test_smollm2_generates_sensible_text(smollm2_dir):
    _, new, text = _generate(
        smollm2_dir,
        [{"role": "user", "content": "What is the capital of France? Answer in one word."}],
        12,
    )
    assert new.numel() > 0
    assert "paris" in text.lower(), text


def test_minilm_embeds(minilm_dir):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir), device="cpu")
    emb = model.encode(
        ["collect wood", "chop a tree for wood", "drink water"], normalize_embeddings=True
    )
    assert emb.shape == (3, 384)
    # Paraphrases are closer than unrelated instructions.
    assert emb[0] @ emb[1] > emb[0] @ emb[2]


def test_run_script_reports_output_and_exit_code(run_script, tmp_path):
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint('hello', sys.argv[1:])\nsys.exit(3)\n")
    res = run_script(str(script), "a", "b", check=False, timeout=60)
    assert res.returncode == 3
    assert "hello ['a', 'b']" in res.output
