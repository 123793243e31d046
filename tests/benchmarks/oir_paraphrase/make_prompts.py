"""A paraphrasing relabeler with known true rows, for the OIR experiment (docs/results.md).

`oir_pqn.py --relabel template` proposes the imperative column of prompts/oir/transitions.md for each observed
transition row and keeps that row as the instruction's ground truth (`--reward gt`). This script writes a copy of
prompts/oir/ whose imperative column is reworded (PARAPHRASES, one per row, written for this experiment): run with
`--prompts-dir` set to it, the template relabeler becomes a paraphrasing relabeler whose true rows are known, so the
semantic reward (which sees only the wording) and the ground truth can differ. No paraphrase equals, after
`oir_pqn.normalize`, an evaluation, seed or template instruction or a transition text (checked here).

    python tests/benchmarks/oir_paraphrase/make_prompts.py /tmp/oir_paraphrase_prompts
"""

import importlib.util
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PARAPHRASES = [  # in transitions.md row order
    "chop some logs off a tree",
    "mine a chunk of rock",
    "dig out some coal",
    "mine iron ore",
    "dig up a diamond",
    "pick up a young tree shoot",
    "fashion a pick from timber",
    "craft a pickaxe out of stone",
    "craft a pickaxe out of iron",
    "craft a sword out of wood",
    "craft a sword out of stone",
    "craft a sword out of iron",
    "hold a pair of logs",
    "hold a trio of logs",
    "stockpile a handful of logs",
    "hold a pair of rocks",
    "hold a trio of rocks",
    "hold a pair of tree shoots",
    "hold a pair of coal lumps",
    "use up logs building something",
    "use up rock building something",
    "set up a workbench somewhere",
    "build a smelter",
    "put a rock block down",
    "put a tree shoot in the ground",
    "have a cow for dinner",
    "have a ripe fruit for dinner",
    "kill one of the undead",
    "kill an archer of bones",
    "heal up",
    "get injured",
    "heal completely",
    "have a meal",
    "fill your belly completely",
    "let yourself go hungry",
    "have a drink",
    "quench your thirst fully",
    "let yourself go thirsty",
    "get rested a little",
    "wear yourself out",
    "take a nap",
    "get out of bed",
    "stay outside after dark",
    "see the morning come",
    "look at a lake",
    "look at a trunk",
    "look at a rock",
    "look at a coal seam",
    "look at iron ore",
    "look at a gem",
    "look at a workbench",
    "look at a smelter",
    "look at molten rock",
    "get close to a lake",
    "get close to a trunk",
    "get close to a rock",
    "get close to a coal seam",
    "get close to iron ore",
    "get close to a gem",
    "get close to a workbench",
    "get close to a smelter",
    "get close to molten rock",
    "get close to a cow",
    "get close to an undead",
    "get close to an archer of bones",
]


def main(out: Path):
    spec = importlib.util.spec_from_file_location("oir_pqn", REPO / "oir_pqn.py")
    oir = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oir)
    src = REPO / "prompts" / "oir"
    rows = oir.read_prompt(src / "transitions.md", 4)
    assert len(rows) == len(PARAPHRASES), (len(rows), len(PARAPHRASES))
    taken = {oir.normalize(r[2]) for _, r in rows} | {oir.normalize(r[3]) for _, r in rows}
    taken |= {oir.normalize(r[1]) for _, r in oir.read_prompt(src / "eval_instructions.md", 3)}
    taken |= {oir.normalize(r[0]) for _, r in oir.read_prompt(src / "seed_instructions.md", 2)}
    clash = [p for p in PARAPHRASES if oir.normalize(p) in taken]
    assert not clash and len(set(PARAPHRASES)) == len(PARAPHRASES), clash
    shutil.copytree(src, out / "oir", dirs_exist_ok=True)
    text = (src / "transitions.md").read_text()
    head, _, body = text.partition("\n---\n")
    lines = body.splitlines()
    by_line = dict(zip([n for n, _ in rows], PARAPHRASES))
    first = head.count("\n") + 3  # read_prompt's numbering of the body's first line
    for i, line in enumerate(lines):
        if i + first in by_line:
            cells = line.split("|")
            lines[i] = "|".join(cells[:3] + [f" {by_line[i + first]}"])
    (out / "oir" / "transitions.md").write_text(head + "\n---\n" + "\n".join(lines) + "\n")
    print(f"wrote {out}/oir (transitions.md imperative column reworded, {len(PARAPHRASES)} rows)")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
