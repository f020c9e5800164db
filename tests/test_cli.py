"""The option machinery both scripts share: config files, refusals, range and choice checks."""

from __future__ import annotations

import pytest

from dataclasses import dataclass

from library.cli import (
    Limit,
    Needs,
    OptionParser,
    Options,
    check_choice,
    check_range,
    check_refused,
    flag,
    load_config_file,
    option,
    option_label,
    parse_key_values,
    refused,
)
from library.errors import UserError


@dataclass(frozen=True)
class _Example(Options):
    group = "example"

    network_dim: int = option(64, type=int, limit=Limit(1), help="rank")
    learning_rate: float = option(1e-4, type=float, help="step size")
    args: dict = option([], name="optimizer_args", nargs="*", held={}, help="name=value items")
    cache_latents: bool = flag(help="cache")
    offset: float | None = option(type=float, help="offset")
    random_offset: bool = flag(needs=Needs("offset"), help="random strength; needs --offset")
    scale: float | None = option(type=float, needs=Needs("offset", "adds to the offset: it needs --offset", error=True),
                                 help="scale")
    prior_loss_weight: None = refused("regularization images do not apply", type=float, reference_default=1.0)
    v2: None = refused("SDXL has no v2", flag=True)


def _parser() -> OptionParser:
    p = OptionParser()
    p.add_options(_Example)
    return p


def test_sections_flatten_and_an_inline_table_is_an_options_value(tmp_path):
    cfg = tmp_path / "train.toml"
    cfg.write_text('[model]\nnetwork_dim = 32\n[optimizer]\nlearning_rate = 1e-3\n'
                   'optimizer_args = { weight_decay = 0.01, betas = [0.9, 0.99], mode = "a" }\n')
    values = load_config_file(str(cfg), _parser())
    assert values["network_dim"] == 32 and values["learning_rate"] == 1e-3
    assert parse_key_values("optimizer_args", values["optimizer_args"]) == {
        "weight_decay": 0.01, "betas": (0.9, 0.99), "mode": "a"}


@pytest.mark.parametrize("text, message", [
    ("network_dimm = 8\n", 'unknown option "network_dimm". Did you mean "network_dim"?'),
    ('network_dim = "8"\n', "network_dim must be an integer, got '8'"),
    ("cache_latents = 1\n", "cache_latents must be true or false"),
    ("network_dim = [\n", "not valid TOML"),
])
def test_config_file_errors_name_the_key(tmp_path, text, message):
    cfg = tmp_path / "train.toml"
    cfg.write_text(text)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config_file(str(cfg), _parser())


def test_refused_options_stop_with_the_reason_but_accept_the_reference_default():
    p = _parser()
    check_refused(p, p.parse_args(["--prior_loss_weight", "1.0"]))
    with pytest.raises(UserError, match="--prior_loss_weight 0.5: regularization images do not apply"):
        check_refused(p, p.parse_args(["--prior_loss_weight", "0.5"]))
    with pytest.raises(UserError, match="--v2 : SDXL has no v2"):
        check_refused(p, p.parse_args(["--v2"]))


def test_range_and_choice_messages_name_option_value_and_range():
    check_range("rate", None, low=0)
    check_range("rate", 0.5, low=0, high=1)
    with pytest.raises(UserError, match=r"--rate 1.5 is out of range: it must be at least 0 and at most 1"):
        check_range("rate", 1.5, low=0, high=1)
    with pytest.raises(UserError, match=r"--lr -1 is out of range: it must be above 0"):
        check_range("lr", -1, low=0, low_open=True)
    assert check_choice("optimizer_type", "adamw8bit", ["AdamW", "AdamW8bit"], case_sensitive=False) == "AdamW8bit"
    with pytest.raises(UserError, match='did you mean "AdamW"'):
        check_choice("optimizer_type", "adamx", ["AdamW", "Lion"])


def test_integer_ranges_are_checked_exactly_and_shown_as_typed():
    # float(2**64 - 1) rounds up to 2**64: the top 1,024 seeds were refused with a rounded number.
    top = 2**64 - 1
    check_range("seed", top, low=0, high=top)
    with pytest.raises(UserError) as e:
        check_range("seed", top + 1, low=0, high=top)
    assert str(e.value) == f"--seed {top + 1} is out of range: it must be at least 0 and at most {top}"


def test_seeds_counted_up_past_the_top_wrap_to_zero():
    from library.generation.jobs import _count_up

    assert _count_up(2**64 - 1, 1) == 0
    assert _count_up(5, 2) == 7


def test_the_options_object_comes_from_the_declarations(caplog):
    p = _parser()
    got = _Example.from_args(p.parse_args(["--network_dim", "8", "--optimizer_args", "a=1", "--cache_latents"]))
    assert (got.network_dim, got.args, got.cache_latents) == (8, ["a=1"], True)
    assert _Example() == _Example(network_dim=64, learning_rate=1e-4, args={}, cache_latents=False)
    assert option_label(_Example, "args") == "--optimizer_args"
    with pytest.raises(UserError, match="--network_dim 0 is out of range: it must be at least 1"):
        _Example.from_args(p.parse_args(["--network_dim", "0"]))


def test_a_switch_that_is_off_warns_or_stops_as_declared(caplog):
    p = _parser()
    with caplog.at_level("WARNING"):
        _Example.from_args(p.parse_args(["--random_offset"]))
    assert "--random_offset does nothing without --offset: ignored, as sd-scripts does" in caplog.text
    with pytest.raises(UserError, match="--scale 0.5 adds to the offset: it needs --offset"):
        _Example.from_args(p.parse_args(["--scale", "0.5"]))
    _Example.from_args(p.parse_args(["--scale", "0.5", "--offset", "0.1", "--random_offset"]))
