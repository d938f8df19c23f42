"""oneshot-bench: fast, reproducible one-shot image classification benchmarks."""

from oneshot_bench.errors import OneShotBenchError

__version__ = "0.1.0"

__all__ = ["OneShotBenchError", "__version__"]
