"""Benchmarks: what a turn, a compression, a batch of users and a user's memory cost."""
