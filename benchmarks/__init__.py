"""Measured comparisons (`make bench`): tables printed, JSON under outputs/bench/."""
