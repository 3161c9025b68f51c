"""Training: freeze policies, the DeepSpeed loop, checkpoints, logging and cached prep steps."""
