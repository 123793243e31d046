"""The readable-scripts contract (DEVELOPERS.md), checked on every run so that no change can pay for a feature by
packing code: code tokens within each script's budget (comments and docstrings excluded; Python 3.11's tokenizer, as
the project's density tool), <= 9.0 code tokens per code line, no line over 100 characters, no function over 80 lines,
at most 3 packed assignments and 2 `:=` per file, no lambda bound to a name, no nested conditional expression, and at
most 40 `Args` fields (hsl_dpo.py: 48)."""

import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUDGET = {  # code tokens
    "keystate_gciql.py": 8_900,
    "keystate_hiql.py": 9_300,
    "oir_pqn.py": 9_200,
    "hsl_sft.py": 10_800,
    "hsl_dpo.py": 12_900,
}
SKIP = {
    tokenize.COMMENT,
    tokenize.NL,
    tokenize.NEWLINE,
    tokenize.INDENT,
    tokenize.DEDENT,
    tokenize.ENDMARKER,
}


def docstring_lines(tree) -> set:
    lines = set()
    for node in ast.walk(tree):
        kinds = (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        if isinstance(node, kinds) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    lines.update(range(first.lineno, first.end_lineno + 1))
    return lines


@pytest.mark.parametrize("script", list(BUDGET))
def test_readable_contract(script):
    src = (REPO / script).read_text()
    tree = ast.parse(src)
    docs = docstring_lines(tree)
    tokens = 0
    code_lines = set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type not in SKIP and tok.start[0] not in docs:
            tokens += 1
            code_lines.update(range(tok.start[0], tok.end[0] + 1))
    nodes = list(ast.walk(tree))
    assert tokens <= BUDGET[script], f"{tokens} code tokens, budget {BUDGET[script]}"
    assert round(tokens / len(code_lines), 1) <= 9.0, tokens / len(code_lines)
    long_lines = [i + 1 for i, line in enumerate(src.splitlines()) if len(line) > 100]
    assert not long_lines, f"lines over 100 characters: {long_lines}"
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    long_functions = [
        (n.name, n.end_lineno - n.lineno + 1)
        for n in nodes
        if isinstance(n, functions) and n.end_lineno - n.lineno + 1 > 80
    ]
    assert not long_functions, f"functions over 80 lines: {long_functions}"
    packed = [
        n.lineno
        for n in nodes
        if isinstance(n, ast.Assign)
        and isinstance(n.targets[0], ast.Tuple)
        and isinstance(n.value, ast.Tuple)
        and len(n.value.elts) >= 2
    ]
    assert len(packed) <= 3, f"packed assignments at lines {packed}"
    assert sum(isinstance(n, ast.NamedExpr) for n in nodes) <= 2
    assert not [
        n.lineno for n in nodes if isinstance(n, ast.Assign) and isinstance(n.value, ast.Lambda)
    ]
    nested = [
        n.lineno
        for n in nodes
        if isinstance(n, ast.IfExp) and any(isinstance(c, ast.IfExp) for c in (n.body, n.orelse))
    ]
    assert not nested, f"nested conditional expressions at lines {nested}"
    args = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    fields = sum(isinstance(x, ast.AnnAssign) for x in args.body)
    assert fields <= (48 if script == "hsl_dpo.py" else 40), f"{fields} Args fields"
