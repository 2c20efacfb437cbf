"""Datasets for vlpipe: the synthetic demo dataset (shape counting with step-by-step solutions)."""
