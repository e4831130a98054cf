from __future__ import annotations

from collections.abc import Sequence
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


def test_flatten_put_merge_and_apply_values():
    from qmath_megatron.config.overrides import apply_values, flatten, merge, put

    nested = {"parallel": {"tp": 2, "vpp": None}, "steps": 3, "blend": [0.5, 0.5]}
    assert flatten(nested) == {
        "parallel.tp": 2,
        "parallel.vpp": None,
        "steps": 3,
        "blend": [0.5, 0.5],
    }
    data: dict = {"parallel": {"tp": 1, "pp": 2}}
    merge(data, {"parallel": {"tp": 4}, "name": "x"})
    put(data, "optim.lr", 0.01)
    assert data == {"parallel": {"tp": 4, "pp": 2}, "name": "x", "optim": {"lr": 0.01}}
    with pytest.raises(ConfigError, match="name.first: name is not a section"):
        put(data, "name.first", 1)
    job = apply_values(Job(), flatten({"parallel": {"tp": 2}, "optim": {"lr": "1e-4"}}))
    assert job.parallel.tp == 2 and job.optim.lr == 1e-4


@dataclass
class Tool:
    inputs: str | Sequence[str]
    output: str
    label: str = "x"


def test_from_dict_names_missing_keys_and_refuses_lists_for_strings():
    from qmath_megatron.config.overrides import from_dict

    with pytest.raises(ConfigError, match="missing config key"):
        from_dict(Tool, {"inputs": ["a"]})
    assert from_dict(Tool, {"inputs": ["a", "b"], "output": "o"}).inputs == ["a", "b"]
    assert from_dict(Tool, {"inputs": "a", "output": 7}).output == "7"
    with pytest.raises(ConfigError, match="label: expected a string"):
        from_dict(Tool, {"inputs": "a", "output": "o", "label": [1]})
    with pytest.raises(ConfigError, match=r"unknown config key\(s\) bogus \(Tool has: inputs"):
        from_dict(Tool, {"inputs": "a", "output": "o", "bogus": 1})


def test_marked_fields_walk_sections_and_keep_a_base_class_marking():
    from qmath_megatron.config.overrides import RESUME_SAFE, marked_fields

    @dataclass
    class Section:
        a: int = field(default=1, metadata=RESUME_SAFE)
        b: int = 2

    @dataclass
    class Base:
        name: str = field(default="base", metadata=RESUME_SAFE)
        section: Section = field(default_factory=Section)
        whole: Section = field(default_factory=Section, metadata=RESUME_SAFE)

    @dataclass
    class Derived(Base):
        name: str = "derived"  # a new default: still marked by Base

    assert marked_fields(Derived(), RESUME_SAFE) == {"name", "section.a", "whole", "whole.a"}
    assert marked_fields(Derived(), {"resume": "other"}) == set()


def test_settings_valid_only_together_apply_in_either_order():
    """Each changed section is validated once with all overrides in place: a remote
    placement with the nccl transfer is valid, though either alone on the 7B recipe (colocated,
    ipc) is refused; the order of the two overrides does not matter."""
    from qmath_megatron.config.overrides import ConfigError, apply_overrides
    from qmath_megatron.rl.recipes import RECIPES

    job = RECIPES["qwen25_math_7b_grpo"]()
    both = ["rl.placement=remote", "rl.weight_transfer=nccl"]
    for overrides in (both, both[::-1]):
        new = apply_overrides(job, overrides)
        assert (new.rl.placement, new.rl.weight_transfer) == ("remote", "nccl")
    with pytest.raises((ConfigError, ValueError)):
        apply_overrides(job, ["rl.weight_transfer=nccl"])
    assert job.rl.placement != "remote"  # the recipe itself is untouched


def test_unknown_key_among_several_overrides_is_named():
    from qmath_megatron.config.overrides import ConfigError, apply_overrides
    from qmath_megatron.rl.recipes import RECIPES

    job = RECIPES["tiny_cpu_grpo"]()
    with pytest.raises(ConfigError, match="rl.nope"):
        apply_overrides(job, ["rl.group_size=4", "rl.nope=1"])
