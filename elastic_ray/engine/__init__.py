"""Continuous batching over fixed-size compressed KV slots."""
