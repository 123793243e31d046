"""Semantic reward vs ground truth for oir_pqn.py's held-out instructions under a uniform random policy (no training).

Runs `oir_pqn.make_evaluate` unchanged, with a stand-in network whose Q-values are fresh random numbers for every env
and step (so its greedy action is uniform), and prints what an evaluation prints: success per instruction, coverage,
and per kind the semantic reward's precision, recall and kappa against the ground truth.
    python tests/benchmarks/oir_reward_agreement.py --embed-model $(python tests/support/wheel_models.py minilm) --episodes 8 --steps 300
The OIR experiment's random-policy floor (docs/results.md): --episodes 16 --steps 150.
"""

import argparse
import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp

REPO = Path(__file__).resolve().parents[2]


class RandomQ:
    """Random 'Q-values' (17 Craftax-Classic actions), keyed by the params (a JAX key) and the observation."""

    @staticmethod
    def apply(params, obs, emb):
        seeds = jax.lax.bitcast_convert_type(obs.sum(-1), jnp.int32)
        return jax.vmap(lambda s: jax.random.uniform(jax.random.fold_in(params, s), (17,)))(seeds)


class NoWriter:
    def add_scalar(self, *args):
        pass


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--embed-model", required=True)
    p.add_argument("--episodes", type=int, default=8)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--delta", type=float, default=0.45)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("oir_pqn", REPO / "oir_pqn.py")
    oir = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(oir)
    args = oir.Args(
        eval_episodes=a.episodes, eval_max_steps=a.steps, embed_model=a.embed_model, delta=a.delta
    )
    prompts = oir.load_prompts(REPO / "prompts" / "oir")
    evals = prompts.evals
    keys = prompts.vocab.keys
    env = oir.make_craftax_env_from_name(oir.ENV_ID, auto_reset=False)
    embed = oir.Embedder(args.embed_model, prompts.vocab.texts)
    evaluate = oir.make_evaluate(
        env, env.default_params, RandomQ(), embed, evals, oir.as_rules(keys), args
    )
    evaluate(jax.random.PRNGKey(7), NoWriter(), 0, jax.random.PRNGKey(1))


if __name__ == "__main__":
    main()
