"""The benchmark suites, on pytest-benchmark: `gxpo-bench kernels` and `gxpo-bench step` run them and write the
markdown tables from their JSON; `make bench-compare` checks them against the committed baselines."""
