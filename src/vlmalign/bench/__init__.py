"""`vlmalign bench`: the cost of one training step per recipe, under the training defaults
and with optimisation switches flipped (modes), side by side.

- modes.py: which config switches each mode flips;
- run.py: `BenchConfig`, the setups, timing (the trainer's own step) and the report run;
- flops.py: analytic FLOP counts per LLM pass, the matmul peak, MFU;
- memory.py: peak tensor memory, resident set, saved activations;
- report.py: ratios between rows and the printed table.

Tests (tests/test_bench.py) check that every mode gives the losses and gradients of a
naive reference written in the tests; wall-clock figures are only printed.
"""

from vlmalign.bench.modes import SWITCHES, ablations, mode_overrides, switch_values
from vlmalign.bench.report import RESULT_KEYS, bench_ratios, bench_table
from vlmalign.bench.run import (
    BENCH_RECIPES,
    BenchConfig,
    ModeSetup,
    RecipeData,
    bench_config,
    bench_from_args,
    measure_modes,
    mode_setup,
    prepare_recipe,
    run_bench,
)

__all__ = [
    "BENCH_RECIPES", "RESULT_KEYS", "SWITCHES", "BenchConfig", "ModeSetup", "RecipeData", "ablations", "bench_config",
    "bench_from_args", "bench_ratios", "bench_table", "measure_modes", "mode_overrides", "mode_setup",
    "prepare_recipe", "run_bench", "switch_values",
]
