"""The Qwen2.5-Math loop as one resumable command, ``qmath pipeline``: stages and their DAG,
run state, executors, recipes, status and report."""
