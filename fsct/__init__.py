"""fsct: few-shot CT segmentation (PANet) from a laptop CPU to multi-node GPU clusters."""

__version__ = "0.1.0"
