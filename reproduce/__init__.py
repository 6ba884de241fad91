"""Reproduction pipeline code: measurement, data, training, evaluation and table making."""
