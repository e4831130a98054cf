from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from qmath_megatron.config.optimizer import OptimConfig
from qmath_megatron.config.overrides import ConfigError, apply_overrides, load_yaml, to_dict
from qmath_megatron.config.parallel import ParallelConfig
from qmath_megatron.config.precision import PrecisionConfig


@dataclass
class Job:
    name: str = "job"
    steps: int = 10
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    blend: list[float] = field(default_factory=lambda: [1.0])


def test_typed_overrides_reach_nested_fields():
    job = apply_overrides(
        Job(),
        [
            "parallel.tp=2",
            "parallel.pp=2",
            "parallel.vpp=null",
            "optim.lr=1e-4",
            "optim.min_lr=1e-5",
            "precision.fp8=hybrid",
            "precision.fp8_recipe=tensorwise",
            "steps=3e2",
            "blend=[0.3,0.7]",
            "parallel.sequence_parallel=true",
        ],
    )
    assert (job.parallel.tp, job.parallel.pp, job.parallel.vpp) == (2, 2, None)
    assert job.optim.lr == 1e-4 and isinstance(job.optim.lr, float)
    assert job.precision.fp8 == "hybrid" and job.steps == 300 and job.blend == [0.3, 0.7]
    assert job.parallel.sequence_parallel is True
    assert Job().parallel.tp == 1  # the original is not mutated


@pytest.mark.parametrize(
    "override,message",
    [
        ("parallel.tpp=2", "unknown config key 'parallel.tpp'"),
        ("parallel.tp=two", "expected an integer"),
        ("steps=2.5", "expected an integer"),
        ("precision.fp8=e5m2", "fits none of"),
        ("parallel.sequence_parallel=maybe", "expected true/false"),
        ("steps", "key.sub=value"),
        ("name.x=1", "cannot set a field"),
    ],
)
def test_bad_overrides_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(Job(), [override])


def test_dataclass_validation_still_runs():
    with pytest.raises(ValueError, match="requires parallel.tp > 1"):
        apply_overrides(Job(), ["parallel.sequence_parallel=true"])


def test_yaml_round_trip(tmp_path):
    import yaml

    job = apply_overrides(Job(), ["parallel.tp=4", "optim.lr=0.001"])
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(to_dict(job)))
    assert load_yaml(Job, path) == job
    path.write_text("parallel: {tp: 2, bogus: 1}\n")
    with pytest.raises(ConfigError, match="parallel.bogus"):
        load_yaml(Job, path)
