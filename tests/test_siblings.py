"""Siblings stay siblings, and every script carries the same LLM client.

* `keystate_hiql.py` is `keystate_gciql.py` with the HIQL learner, and `hsl_dpo.py` is `hsl_sft.py` with the DPO
  stage: every top-level function and class present in both files of a pair has identical source, except the short
  allowlists below (the learner, and what wires it in); so has every module-level constant both files define
  (`MAX_LAG`, `HSL_EPOCHS`, ...), but for the constants that differ by design (ALLOWED_CONSTANTS).
* `LLMClient` (class source) and the `llm_*` fields of `Args` (names, types, help) are identical in all five scripts.
* Each script's PEP 723 header pins exactly the versions requirements.txt pins.
"""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["keystate_gciql.py", "keystate_hiql.py", "hsl_sft.py", "hsl_dpo.py", "oir_pqn.py"]

# Names allowed to differ inside a pair: the learner and the code that wires it in. Keep these short.
ALLOWED = {
    ("keystate_gciql.py", "keystate_hiql.py"): {
        "Args",
        "resolve_presets",
        "sample_batch",
        "make_agent",
        "value_loss",
        "make_update",
        "make_policy",
    },
    ("hsl_sft.py", "hsl_dpo.py"): {"Args", "check_args", "main"},
}


# Module-level constants allowed to differ inside a pair (by design, with the reference learners).
ALLOWED_CONSTANTS = {
    ("keystate_gciql.py", "keystate_hiql.py"): {
        "EXPECTILE",
        "RANGES",
    },  # EXPECTILE: GCIQL 0.9, HIQL 0.7 (OGBench)
    ("hsl_sft.py", "hsl_dpo.py"): {"RANGES"},  # the DPO flags have ranges too
}


def top_level(path: Path) -> dict:
    src = path.read_text()
    tree = ast.parse(src)
    return {
        n.name: ast.get_source_segment(src, n)
        for n in tree.body
        if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
    }


@pytest.mark.parametrize("pair", list(ALLOWED), ids=lambda p: f"{p[0]}~{p[1]}")
def test_sibling_scripts_share_their_code(pair):
    a, b = (top_level(REPO / f) for f in pair)
    shared = sorted(set(a) & set(b))
    assert len(shared) >= 10, f"the pair shares only {shared}"
    differ = [n for n in shared if a[n] != b[n] and n not in ALLOWED[pair]]
    assert not differ, f"{pair[0]} and {pair[1]} differ outside the allowlist in: {differ}"


def constants(src: str) -> dict:
    """{NAME: value source} of the module-level assignments to UPPER_CASE names."""
    out = {}
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets = [node.target]
        else:
            continue
        for t in targets:
            if isinstance(t, ast.Name) and t.id.isupper():
                out[t.id] = ast.unparse(node.value)
    return out


def differing_constants(src_a: str, src_b: str) -> list:
    a, b = constants(src_a), constants(src_b)
    return sorted(n for n in set(a) & set(b) if a[n] != b[n])


@pytest.mark.parametrize("pair", list(ALLOWED_CONSTANTS), ids=lambda p: f"{p[0]}~{p[1]}")
def test_sibling_scripts_share_their_constants(pair):
    a, b = ((REPO / f).read_text() for f in pair)
    assert len(set(constants(a)) & set(constants(b))) >= 5, "the pair shares almost no constants"
    differ = [n for n in differing_constants(a, b) if n not in ALLOWED_CONSTANTS[pair]]
    assert not differ, f"{pair[0]} and {pair[1]} define these constants differently: {differ}"


def test_a_changed_shared_constant_is_caught():
    """The constant check fails when one sibling changes a shared constant (here MAX_LAG, HSL_EPOCHS)."""
    for pair, name in [
        (("keystate_gciql.py", "keystate_hiql.py"), "MAX_LAG"),
        (("hsl_sft.py", "hsl_dpo.py"), "HSL_EPOCHS"),
    ]:
        a, b = ((REPO / f).read_text() for f in pair)
        changed = re.sub(rf"^{name} = [^ #\n]+", f"{name} = 12345", b, count=1, flags=re.M)
        differ = [n for n in differing_constants(a, changed) if n not in ALLOWED_CONSTANTS[pair]]
        assert changed != b and differ == [name], (pair, name)


def llm_fields(path: Path) -> list:
    src = path.read_text()
    args = next(n for n in ast.parse(src).body if isinstance(n, ast.ClassDef) and n.name == "Args")
    out = []
    for i, node in enumerate(args.body):
        if isinstance(node, ast.AnnAssign) and node.target.id.startswith("llm_"):
            doc = args.body[i + 1] if i + 1 < len(args.body) else None
            doc = (
                doc.value.value
                if isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                else None
            )
            default = ast.unparse(node.value) if node.target.id == "llm_backend" else None
            out.append((node.target.id, ast.unparse(node.annotation), default, doc))
    return out


def test_one_llm_client_shape_in_all_scripts():
    clients = {s: top_level(REPO / s).get("LLMClient") for s in SCRIPTS}
    assert all(clients.values()), [s for s, c in clients.items() if not c]
    assert len(set(clients.values())) == 1, "LLMClient differs between scripts"
    fields = {s: llm_fields(REPO / s) for s in SCRIPTS}
    names = [f[0] for f in fields[SCRIPTS[0]]]
    assert names[:2] == ["llm_backend", "llm_model"] and "llm_base_url" in names, names
    assert all(f == fields[SCRIPTS[0]] for f in fields.values()), fields


def pins(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        m = re.match(r"""^\s*#?\s*"?([A-Za-z0-9_.\-\[\]]+)==([^"\s,]+)""", line)
        if m:
            out[re.sub(r"\[.*\]", "", m.group(1)).lower()] = m.group(2)
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_pep723_header_pins_equal_requirements(script):
    text = (REPO / script).read_text()
    m = re.search(r"^# /// script\n((?:#.*\n)+?)# ///$", text, re.M)
    assert m, f"{script} has no PEP 723 header"
    header = pins(m.group(1))
    required = pins((REPO / "requirements.txt").read_text())
    assert len(header) >= 5, header
    wrong = {k: v for k, v in header.items() if required.get(k) != v}
    assert not wrong, f"{script} header pins differ from requirements.txt: {wrong}"


# --- the flags every script shares: README's table against the five `Args` classes ---
FAMILIES = ("keystate", "oir", "hsl")


def args_fields(path: Path) -> dict:
    """{field: (annotation AST dump, default AST dump)} of the script's `Args` dataclass."""
    tree = ast.parse(path.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    return {
        n.target.id: (ast.dump(n.annotation), ast.dump(n.value))
        for n in cls.body
        if isinstance(n, ast.AnnAssign)
    }


def code_dump(text: str) -> str:
    return ast.dump(ast.parse(text, mode="eval").body)


def shared_flags_table() -> dict:
    """README's rows after `<!-- shared-flags -->`: {field: (type dump, {family or None: default dump})}.
    A default cell holds one value for all scripts, or values each followed by the families it holds for
    in parentheses: "`50` chunks (oir), `50` HSL steps (hsl)"."""
    text = (REPO / "README.md").read_text().split("<!-- shared-flags -->", 1)[1]
    rows = {}
    for line in text.strip().splitlines()[2:]:
        if not line.startswith("|"):
            break
        flag, typ, default = (c.strip() for c in line.strip("|").split("|")[:3])
        field = flag.strip("`").removeprefix("--").replace("-", "_")
        values = {}
        for value, note in re.findall(r"`([^`]+)`[^`(]*(?:\(([^)]*)\))?", default):
            for family in [f for f in FAMILIES if f in note] or [None]:
                values.setdefault(family, code_dump(value))
        if (
            any(values) and None in values
        ):  # a value with no family named: only the parenthesised ones count
            del values[None]
        rows[field] = (code_dump(typ.strip("`")), values)
    return rows


def test_shared_flags_table_parses():
    rows = shared_flags_table()
    assert {"seed", "run_dir", "eval_every", "exp_name", "track", "llm_model"} <= set(rows)
    assert set(rows["eval_every"][1]) == set(FAMILIES)  # one value per family
    assert set(rows["seed"][1]) == {None}  # one value for all


@pytest.mark.parametrize("script", SCRIPTS)
def test_shared_flags_table_matches_args(script):
    fields = args_fields(REPO / script)
    family = next(f for f in FAMILIES if script.startswith(f))
    for field, (typ, values) in shared_flags_table().items():
        assert field in fields, f"{script} has no --{field.replace('_', '-')}"
        assert fields[field][0] == typ, f"{script}: --{field} has another type than README's table"
        want = values.get(family, values.get(None))
        assert fields[field][1] == want, (
            f"{script}: --{field} has another default than README's table"
        )


def test_flags_all_scripts_share_are_in_the_table():
    common = set.intersection(*(set(args_fields(REPO / s)) for s in SCRIPTS))
    assert common == set(shared_flags_table()), (
        "README's shared-flags table and the flags all five share differ"
    )


def test_dpo_main_runs_every_phase_of_sft_main():
    """hsl_dpo.py's `main` differs from hsl_sft.py's (the ETO rounds) but calls every function sft's `main` calls."""

    def calls(path: Path) -> set:
        tree = ast.parse(path.read_text())
        main = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main")
        return {
            c.func.id
            for c in ast.walk(main)
            if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)
        }

    sft, dpo = calls(REPO / "hsl_sft.py"), calls(REPO / "hsl_dpo.py")
    assert {"load_inputs", "load_learner", "sft_phase", "hsl_phase", "write_summary"} <= sft
    assert not sft - dpo, f"hsl_dpo.py's main skips {sorted(sft - dpo)}"
