"""Fidelity of a compressed cache against the full cache and the ground truth."""
