"""Simulated PBXs, stores and whole-system simulations for tests, benchmarks and the demo."""
