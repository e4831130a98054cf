"""Reinforcement learning (GRPO) on Megatron-Core with vLLM rollout engines: weight sync,
rewards, advantages, the PPO-clip loss and metrics (pure, shape-documented functions)."""
