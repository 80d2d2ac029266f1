"""gxpo-bench: kernel and training-step benchmarks with roofline floors (see `gxpo-bench --help`)."""
