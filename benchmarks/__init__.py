"""Benchmarks of torchdeq_pcdeq (run as ``python -m benchmarks.<name>``)."""
