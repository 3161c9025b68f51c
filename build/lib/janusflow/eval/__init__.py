"""Evaluation: GenEval-style scoring of generated shapes images and other metrics."""
