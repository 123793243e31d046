"""Scripted relabeler answers for the hsl tests: Figure 8 (goal inference) and Figure 9 (action relevance) of the HSL
paper as an LLM would write them, served by tests/support/scripted_llm.py."""

import json
import re


def figure8(goals_at: dict, T: int) -> str:
    """A Figure 8-style answer: one object per step with location, inventory and the running reached_goals list."""
    running, out = [], []
    for k in range(1, T + 1):
        running = running + goals_at.get(k, [])
        out.append(
            {
                "step": k,
                "action": "...",
                "observation": "...",
                "reasoning": "...",
                "location": "shelf 1",
                "inventory": [],
                "reached_goals": list(running),
            }
        )
    return "```json\n" + json.dumps(out) + "\n```"


def figure9(labels: list) -> str:
    return json.dumps(
        [
            {"step": k + 1, "reasoning": "...", "is_relevant_to_goal": v}
            for k, v in enumerate(labels)
        ]
    )


def is_goal_inference(messages) -> bool:
    return "goal-inference" in messages[0]["content"]


def any_goal(messages) -> str:
    """A scripted relabeler that fills D' from any trajectory: Figure 8 names a template goal built from the first two
    entities the trajectory mentions, reached at step 1; Figure 9 marks every step relevant."""
    text = messages[1]["content"]
    steps = len(re.findall(r"^Step \d+:", text, re.M))
    if not is_goal_inference(messages):
        return figure9(["yes"] * steps)
    a, b = re.findall(r"\b([a-z]+) \d+\b", text)[:2]
    return figure8({1: [f"put a {a} in {b}"]}, steps)


def scripted_relabeler(server) -> list:
    return [
        "--relabeler",
        "llm",
        "--llm-backend",
        "openai",
        "--llm-base-url",
        server.base_url,
        "--llm-model",
        "scripted",
    ]
