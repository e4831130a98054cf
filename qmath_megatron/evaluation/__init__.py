"""Evaluation: Qwen2.5-Math prompts (CoT, TIR), benchmarks, the TIR loop, metrics
(greedy, pass@k, maj@k, rm@k) and the ``qmath eval`` runner."""
