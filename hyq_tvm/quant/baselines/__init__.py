"""Baseline calibration methods, for comparison with Q-HyViT."""
