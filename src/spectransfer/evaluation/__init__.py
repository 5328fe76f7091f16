"""Honest evaluation: metrics, the runner that scores runs, the report, learning curves."""
