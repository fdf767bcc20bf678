"""zmqfed benchmarks: python tools/bench/run.py [--quick] [--only NAME] [--out docs]."""
