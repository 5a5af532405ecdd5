"""fastgrpo's GRPOConfig against the installed TRL's, field by field: names, defaults and values after construction.

The comparison is generated from the `trl` package (a test dependency, pinned), not from a table of ours, so it
cannot drift: a difference that docs/trl-compatibility.md does not list fails here, and so does a listed
difference that is no longer one.
"""

import dataclasses
import re
import warnings
from pathlib import Path

import pytest

from fastgrpo.config import UNSUPPORTED_TRL_FIELDS, GRPOConfig

trl = pytest.importorskip("trl")

PAGE = Path(__file__).parents[1] / "docs" / "trl-compatibility.md"
# Values that depend on the machine, not on a choice of ours: bf16 is on where the device computes it fast.
MACHINE_DEPENDENT = {"bf16"}


def field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def default_differences() -> dict[str, tuple]:
    """{field: (TRL's value, ours)} for every TRL field whose declared default or whose value after
    construction with defaults differs (both built alike: output_dir and use_cpu only)."""
    ours = {f.name: f for f in dataclasses.fields(GRPOConfig)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs_built = trl.GRPOConfig(output_dir="out", use_cpu=True)
        ours_built = GRPOConfig(output_dir="out", use_cpu=True)
    differences = {}
    for f in dataclasses.fields(trl.GRPOConfig):
        assert f.name in ours, f"TRL's GRPOConfig.{f.name} is not a field of fastgrpo's"
        declared = (field_default(f), field_default(ours[f.name]))
        built = (getattr(theirs_built, f.name), getattr(ours_built, f.name))
        if declared[0] != declared[1] or (built[0] != built[1] and f.name not in MACHINE_DEPENDENT):
            differences[f.name] = declared
    return differences


def documented_differences() -> dict[str, tuple[str, str]]:
    """The page's "Defaults that differ" table: {field: (TRL's default, ours)}, as written there."""
    section = PAGE.read_text().split("## Defaults that differ", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| `([^`]*)` \| `([^`]*)` \|", section, flags=re.M)
    return {name: (trl_value, our_value) for name, trl_value, our_value in rows}


def test_every_trl_field_exists_and_every_default_difference_is_documented():
    found, documented = default_differences(), documented_differences()
    undocumented = {n: v for n, v in found.items() if n not in documented}
    assert not undocumented, f"defaults that differ from TRL {trl.__version__} and are not in {PAGE.name}: {undocumented}"
    for name, (theirs, ours) in found.items():
        assert documented[name] == (repr(theirs), repr(ours)), (name, documented[name], (theirs, ours))
    stale = set(documented) - set(found) - MACHINE_DEPENDENT
    assert not stale, f"{PAGE.name} lists differences that are gone: {sorted(stale)}"


def test_the_differences_are_the_known_few():
    """The list itself, so that a new difference is a decision, made here, and not an accident."""
    assert set(default_differences()) == {"vllm_mode", "gradient_checkpointing", "ddp_timeout"}


def test_fastgrpo_fields_beyond_trls_are_documented():
    theirs = {f.name for f in dataclasses.fields(trl.GRPOConfig)}
    ours_only = [f.name for f in dataclasses.fields(GRPOConfig) if f.name not in theirs]
    page = PAGE.read_text()
    missing = [name for name in ours_only if f"`{name}`" not in page]
    assert not missing, f"fields of ours only, missing from {PAGE.name}: {missing}"


def test_the_page_lists_every_unsupported_field():
    page = PAGE.read_text()
    for name, (default, instead) in UNSUPPORTED_TRL_FIELDS.items():
        assert f"| `{name}` | `{default!r}` | {instead} |" in page, name
        f = next(f for f in dataclasses.fields(trl.GRPOConfig) if f.name == name)
        assert field_default(f) == default, f"{name}: TRL's default is {field_default(f)!r}, we say {default!r}"


def test_a_trl_config_constructs_with_the_same_values(tmp_path):
    """A config a TRL script writes, with TRL's names, builds ours with the same values."""
    kwargs = dict(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8, num_generations=4,
                  max_completion_length=32, learning_rate=1e-5, beta=0.04, loss_type="dr_grpo", epsilon_high=0.28,
                  scale_rewards="batch", generation_kwargs={"min_tokens": 1}, use_vllm=True, vllm_mode="server",
                  entropy_coef=0.01, multi_objective_aggregation="normalize_then_sum", pad_to_multiple_of=16,
                  min_p=0.05, top_entropy_quantile=0.8, mask_truncated_completions=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs, ours = trl.GRPOConfig(**kwargs), GRPOConfig(**kwargs)
    for name in kwargs:
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in ("generation_batch_size", "steps_per_generation", "vllm_importance_sampling_clip_max"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_dict_fields_read_json_flags_as_trls_do(tmp_path):
    """TRL types model_init_kwargs, generation_kwargs, chat_template_kwargs as `dict | str` so that a script's
    HfArgumentParser takes them as JSON flags; ours read to the same dicts."""
    from transformers import HfArgumentParser

    trl = pytest.importorskip("trl")
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true", "--model_init_kwargs", '{"dtype": "float32"}',
            "--generation_kwargs", '{"min_tokens": 2}', "--chat_template_kwargs", '{"enable_thinking": false}']
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (theirs,) = HfArgumentParser(trl.GRPOConfig).parse_args_into_dataclasses(argv)
    (ours,) = HfArgumentParser(GRPOConfig).parse_args_into_dataclasses(argv)
    for name in ("model_init_kwargs", "generation_kwargs", "chat_template_kwargs"):
        assert getattr(ours, name) == getattr(theirs, name) and isinstance(getattr(ours, name), dict), name
