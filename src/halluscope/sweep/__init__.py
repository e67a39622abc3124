"""Exact, batched, prefix-sharing head-knockout sweeps."""
