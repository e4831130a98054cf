"""Training stages as tasks of the shared loop (see :mod:`qmath_megatron.training.task`)."""
