"""Benchmarks that run on a GPU and write results/ (kernels, allocations, whole models)."""
