"""lpa_bench: the lpa-bench kernel, memory and training-step benchmarks (see README.md here)."""
