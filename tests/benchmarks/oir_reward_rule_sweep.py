"""OIR's semantic reward rule and its threshold, measured on a calibration set (no environment, no training).

The reward of an instruction i fires at a step when one of the step's transition texts (prompts/oir/transitions.md) is
in i's reward set. Two rules for that set, both over cosine similarities of all-MiniLM-L6-v2 embeddings:
- paper: every transition text with cos(f_state, f_instr(i)) > delta (the OIR summaries' rule);
- best: only the most similar transition text, if its cosine is > delta (oir_pqn.py's `--reward best`; the paper's rule is
  its default `--reward semantic`).

Calibration set (CALIBRATION below, written by hand for this measurement): instructions of five kinds, each with the
transition texts that accomplish it (its true set; several when they fire together, e.g. eating a cow also raises
food), and "opposite" instructions that no transition accomplishes (avoid, do not ...), whose true set is empty. None
equals, after oir_pqn.normalize, an evaluation instruction (prompts/oir/eval_instructions.md) or a transition text or
template instruction (transitions.md): checked at start. Per kind, delta and rule, over the (instruction x transition
text) table: precision (rewarded texts that are true), recall (instructions with a non-empty true set for which at
least one true text is rewarded: the reward can fire when it should) and Cohen's kappa of the rewarded cells against
the true cells; plus, for the opposites, how many are rewarded at all.

    python tests/benchmarks/oir_reward_rule_sweep.py --embed-model $(python tests/support/wheel_models.py minilm) \
        --json-out docs/results/oir_reward_rule_sweep.json
"""

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]

# kind -> {instruction: [transition texts that accomplish it]}
CALIBRATION = {
    "paraphrase": {
        "chop down a tree for logs": ["collected wood from a tree"],
        "dig out a piece of stone": ["collected stone"],
        "mine coal ore": ["collected coal"],
        "dig up some iron ore": ["collected iron"],
        "find and mine a diamond": ["collected a diamond"],
        "pick up a sapling from the grass": ["collected a sapling"],
        "build a wooden pickaxe": ["made a wooden pickaxe"],
        "craft a pickaxe made of stone": ["made a stone pickaxe"],
        "forge an iron pickaxe": ["made an iron pickaxe"],
        "craft a sword from wood": ["made a wooden sword"],
        "craft a sword out of stone": ["made a stone sword"],
        "set down a crafting bench": ["placed a crafting table"],
        "put a furnace on the ground": ["placed a furnace"],
        "put a stone block down": ["placed stone"],
        "plant a seedling": ["planted a sapling"],
        "kill and eat a cow": ["ate a cow", "ate some food"],
        "eat a ripe fruit from a plant": ["ate a ripe plant", "ate some food"],
        "slay a skeleton": ["defeated a skeleton"],
        "fight a zombie and win": ["defeated a zombie"],
        "have a drink of water": ["drank water"],
        "take a nap": ["fell asleep"],
        "wake from sleep": ["woke up"],
        "heal yourself": ["recovered some health"],
        "get injured": ["got hurt and lost health"],
        "recover your energy": ["regained some energy"],
        "have a meal": ["ate some food", "ate a cow", "ate a ripe plant"],
        "use up some wood to build something": ["spent wood on crafting or building"],
    },
    "count": {
        "gather two logs": ["has collected two wood"],
        "get three logs of wood": ["has collected three wood"],
        "chop five logs": ["has collected five wood"],
        "mine two stones": ["has collected two stones"],
        "mine three stone blocks": ["has collected three stones"],
        "dig two lumps of coal": ["has collected two coal"],
        "pick up a pair of saplings": ["has collected two saplings"],
    },
    "proximity": {
        "walk over to the lake": ["is standing next to water"],
        "approach a cow": ["is standing next to a cow"],
        "move next to a zombie": ["is standing next to a zombie"],
        "go stand beside the furnace": ["is standing next to a furnace"],
        "look at a tree": ["is facing a tree"],
        "turn toward the water": ["is facing water"],
        "stand by some iron ore": ["is standing next to iron"],
    },
    "vitals": {
        "become completely full": ["is full, no longer hungry"],
        "heal back to full health": ["is back at full health"],
        "let yourself starve": ["became starving"],
        "get very thirsty": ["became dehydrated"],
        "wait until nightfall": ["night fell, it got dark"],
        "let the night end": ["the sun rose, a new day began"],
        "stay up until morning": ["the sun rose, a new day began"],
    },
    "opposite": {
        "avoid the zombie": [],
        "run away from the skeleton": [],
        "do not drink any water": [],
        "never go near the lava": [],
        "do not cut down any trees": [],
        "spare the cow, do not eat it": [],
        "stay awake all night": [],
    },
}
DELTAS = [0.35, 0.40, 0.45, 0.50, 0.55, 0.60, 0.65, 0.70, 0.75]


def load_oir():
    spec = importlib.util.spec_from_file_location("oir_pqn", REPO / "oir_pqn.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def table_rows(path: Path):
    """The `|`-separated rows of a prompt file's body (after its '---' line), comments left out."""
    body = path.read_text().split("\n---\n", 1)[1]
    return [
        [c.strip() for c in line.split("|")]
        for line in body.splitlines()
        if line.strip() and not line.startswith("#")
    ]


def kappa(pred: np.ndarray, true: np.ndarray) -> float:
    """Cohen's kappa of two binary labelings of the same cells."""
    po = (pred == true).mean()
    pe = pred.mean() * true.mean() + (1 - pred.mean()) * (1 - true.mean())
    return float((po - pe) / (1 - pe)) if pe < 1 else 1.0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embed-model", required=True)
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    oir = load_oir()
    transitions = table_rows(REPO / "prompts" / "oir" / "transitions.md")
    texts = [r[2] for r in transitions]
    evaluation = [r[1] for r in table_rows(REPO / "prompts" / "oir" / "eval_instructions.md")]
    taken = {oir.normalize(t) for t in texts + [r[3] for r in transitions] + evaluation}
    for kind, items in CALIBRATION.items():
        for instr, truth in items.items():
            assert oir.normalize(instr) not in taken, (
                f"calibration instruction {instr!r} is not held out"
            )
            assert all(t in texts for t in truth), f"{instr!r}: {truth} not all transition texts"
    embed = oir.Embedder(a.embed_model, texts)
    out = {}
    print("| kind | rule | " + " | ".join(f"delta {d:.2f}" for d in DELTAS) + " |")
    print("|---|---|" + "---|" * len(DELTAS))
    for kind, items in CALIBRATION.items():
        sims = embed(list(items)) @ embed.events.T  # (instructions, texts)
        true = np.array([[t in truth for t in texts] for truth in items.values()])
        has_truth = true.any(1)
        for rule in ("paper", "best"):
            cells = []
            for delta in DELTAS:
                pred = sims > delta
                if rule == "best":
                    pred &= sims >= sims.max(1, keepdims=True)
                tp = int((pred & true).sum())
                n_pred = int(pred.sum())
                precision = tp / n_pred if n_pred else float("nan")
                hit = (pred & true).any(1)
                recall = float(hit[has_truth].mean()) if has_truth.any() else float("nan")
                rewarded = int(pred.any(1).sum())
                stats = dict(
                    precision=precision,
                    recall=recall,
                    kappa=kappa(pred, true),
                    rewarded_texts=n_pred,
                    instructions_rewarded=rewarded,
                    instructions=len(items),
                )
                out.setdefault(kind, {}).setdefault(rule, {})[f"{delta:.2f}"] = stats
                if kind == "opposite":
                    cells.append(f"{rewarded}/{len(items)} rewarded ({n_pred} texts)")
                else:
                    cells.append(f"P {precision:.2f} R {recall:.2f} k {stats['kappa']:.2f}")
            print(f"| {kind} | {rule} | " + " | ".join(cells) + " |")
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
