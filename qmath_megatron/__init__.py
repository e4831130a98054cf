"""qmath_megatron: the Qwen2.5-Math recipe end to end on Megatron-Core."""

__version__ = "0.1.0"
