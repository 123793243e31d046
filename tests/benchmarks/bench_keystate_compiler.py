"""Benchmark: seconds keystate_gciql.py's rule compiler takes on 1M states (the paper's scale target: under 2 s on
CPU), and on adversarially nested temporal functions over 100k states. Timings live here, not in the test suite
(tests/test_keystate_gciql.py asserts the counts that bound the cost: one read per feature occurrence).
    OMP_NUM_THREADS=1 python tests/benchmarks/bench_keystate_compiler.py --repeats 3
"""

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
RULE = (
    "abs(delta(x, 5) * delta(next(y, 5), 5) - delta(y, 5) * delta(next(x, 5), 5)) > 0.5"
    " or norm(delta(x, 3), delta(y, 3)) < 0.15"
)


def features(ks, n: int):
    """n random 2-d states in episodes of 1000 rows, as ogbench.load_dataset(compact_dataset=True) returns them."""
    rng = np.random.default_rng(0)
    term = np.zeros(n, np.float32)
    term[999::1000] = 1
    obs = rng.normal(size=(n, 2)).astype(np.float32)
    ds = {"observations": obs, "valids": 1.0 - term}
    return ks.Features(ds, {"x": 0, "y": 1})


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    spec = importlib.util.spec_from_file_location("keystate_gciql", REPO / "keystate_gciql.py")
    ks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ks)
    big = features(ks, 1_000_000)
    print(
        f"1M states, a 2-rule condition: {best_of(a.repeats, lambda: ks.compile_condition(RULE, big)):.3f} s"
    )
    small = features(ks, 100_000)
    for fn in ("prev", "next", "delta"):
        expr = f"{fn}(" * ks.MAX_LAG + "x + y" + ", 1)" * ks.MAX_LAG + " > 0"
        seconds = best_of(a.repeats, lambda: ks.compile_condition(expr, small))
        print(f"100k states, {fn} nested {ks.MAX_LAG} deep: {seconds:.3f} s")


if __name__ == "__main__":
    main()
