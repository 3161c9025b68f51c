"""Model components of JanusFlow."""
