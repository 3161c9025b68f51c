"""Data: the procedural shapes world and readers of real dataset formats."""
