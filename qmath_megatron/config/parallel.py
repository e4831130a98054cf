"""Parallel layout of a job: how the world is split into TP x CP x DP x PP."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    """Tensor / pipeline / context / data parallel sizes.

    ``dp`` is normally derived from the world size (``world / (tp * pp * cp)``); setting it
    makes the launcher check that the job was started with the intended number of ranks.
    """

    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    cp: int = 1
    dp: int | None = None
    sequence_parallel: bool = False

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel.{name} must be a positive integer, got {value!r}")
        if self.vpp is not None and (self.vpp < 1 or self.pp < 2):
            raise ValueError(
                f"parallel.vpp={self.vpp} needs pipeline parallelism (parallel.pp >= 2, got "
                f"{self.pp}) and must be >= 1; use vpp=None to disable interleaving"
            )
        if self.vpp == 1:
            self.vpp = None
        if self.sequence_parallel and self.tp == 1:
            # Megatron silently turns this off at TP=1; say so instead of surprising users.
            raise ValueError("parallel.sequence_parallel=True requires parallel.tp > 1")

    @property
    def model_parallel_size(self) -> int:
        """Ranks that together hold one copy of the model (TP x PP x CP)."""
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        """DP size for a world; raises if the world does not factor as TP x PP x CP x DP."""
        if world_size % self.model_parallel_size:
            raise ValueError(
                f"world size {world_size} is not divisible by tp*pp*cp = "
                f"{self.tp}*{self.pp}*{self.cp} = {self.model_parallel_size}"
            )
        dp = world_size // self.model_parallel_size
        if self.dp is not None and self.dp != dp:
            raise ValueError(
                f"parallel.dp={self.dp} but world size {world_size} with tp={self.tp}, "
                f"pp={self.pp}, cp={self.cp} gives dp={dp}"
            )
        return dp
