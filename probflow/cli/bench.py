"""`probflow bench`: the benchmark's command (its arguments and run live with the benchmark)."""

from probflow.bench import add_bench_arguments, run_bench

__all__ = ["add_bench_arguments", "run_bench"]
