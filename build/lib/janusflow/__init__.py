"""janusflow: train, fine-tune and sample JanusFlow (unified understanding + rectified-flow generation)."""

__version__ = "0.1.0"
