"""Does oir_pqn.py's proposal filter accept instructions that contradict the event they are grounded on?

Measured without the environment: each hand-labelled opposite (OPPOSITES: a proposal and the transition text it
contradicts, e.g. "avoid the zombie" for "defeated a zombie") goes through `oir_pqn.filter_proposals` with that text
observed in the trajectory (the case the filter must catch); each correct proposal (the calibration paraphrases,
counts, proximity and vitals instructions of oir_reward_rule_sweep.py, the template instructions of
prompts/oir/transitions.md and the paraphrasing relabeler's, each with its true texts observed) goes through the same
way. Reported with the negation check (`_NEGATION`) and without it (before the fix): opposites accepted (should be 0)
and correct proposals rejected as `contradicts` (the fix's cost).

    python tests/benchmarks/oir_opposites.py --embed-model $(python tests/support/wheel_models.py minilm) \
        --json-out docs/results/oir_opposites.json
"""

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from oir_paraphrase.make_prompts import PARAPHRASES  # noqa: E402
from oir_reward_rule_sweep import CALIBRATION, REPO, load_oir, table_rows  # noqa: E402

# proposal -> the transition text it contradicts (hand-labelled: ended/fell, avoid/defeat, lose/gain, wake/sleep, ...)
OPPOSITES = {
    "avoid the zombie": "defeated a zombie",
    "run away from the skeleton": "defeated a skeleton",
    "do not drink any water": "drank water",
    "never go near the lava": "is standing next to lava",
    "do not cut down any trees": "collected wood from a tree",
    "spare the cow, do not eat it": "ate a cow",
    "stay awake all night": "fell asleep",
    "the night ended": "night fell, it got dark",
    "night is over": "night fell, it got dark",
    "keep away from the cow": "is standing next to a cow",
    "lose some health": "recovered some health",
    "gain health": "got hurt and lost health",
    "stop eating": "ate some food",
    "fail to find water": "drank water",
    "never place a crafting table": "placed a crafting table",
    "without making a pickaxe": "made a wooden pickaxe",
    "escape from the zombie": "is standing next to a zombie",
    "leave the stone alone": "collected stone",
    "go to bed": "woke up",
    "stay hungry": "ate some food",
}


def accepted_by(oir, embed, proposal, true_texts, texts):
    observed = {texts.index(t) for t in true_texts}
    accepted, rejected = oir.filter_proposals([proposal], 1, observed, [], embed, 0.45)
    return bool(accepted), next(iter(rejected), "accepted")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embed-model", required=True)
    p.add_argument("--json-out", default=None)
    a = p.parse_args()
    oir = load_oir()
    transitions = table_rows(REPO / "prompts" / "oir" / "transitions.md")
    texts = [r[2] for r in transitions]
    embed = oir.Embedder(a.embed_model, texts)
    correct = {
        t: truth
        for kind, items in CALIBRATION.items()
        if kind != "opposite"
        for t, truth in items.items()
    }
    correct |= {r[3]: [r[2]] for r in transitions}  # template instructions
    correct |= {p: [r[2]] for p, r in zip(PARAPHRASES, transitions)}  # the paraphrasing relabeler's
    negation = oir._NEGATION
    out = {}
    for name, pattern in (
        ("without the negation check", re.compile(r"(?!x)x")),
        ("with it", negation),
    ):
        oir._NEGATION = pattern
        opp = {q: accepted_by(oir, embed, q, [t], texts) for q, t in OPPOSITES.items()}
        cor = {q: accepted_by(oir, embed, q, truth, texts) for q, truth in correct.items()}
        n_opp = sum(ok for ok, _ in opp.values())
        lost = sorted(q for q, (_, why) in cor.items() if why == "contradicts")
        n_cor = sum(ok for ok, _ in cor.values())
        print(
            f"{name}: opposites accepted {n_opp}/{len(opp)}; correct proposals accepted {n_cor}/{len(cor)}, "
            f"rejected as contradicting {len(lost)} {lost}"
        )
        print("  opposites still accepted:", [q for q, (ok, _) in opp.items() if ok])
        out[name] = {
            "opposites_accepted": n_opp,
            "opposites": len(opp),
            "opposite_outcomes": {q: why for q, (_, why) in opp.items()},
            "correct_accepted": n_cor,
            "correct": len(cor),
            "correct_rejected_as_contradicting": lost,
        }
    oir._NEGATION = negation
    if a.json_out:
        Path(a.json_out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
