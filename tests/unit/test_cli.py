"""The serve command's flags: on/off flags in both forms, and --help in titled groups."""

from __future__ import annotations

import dataclasses

import pytest

from embedserve.cli import build_config, build_parser
from embedserve.config import EngineConfig, ModelConfig, ServerConfig


def config(*flags: str, env: dict[str, str] | None = None):
    return build_config(build_parser(env or {}).parse_args(["serve", *flags]))


@pytest.mark.parametrize("flags, truncate", [
    ((), True),
    (("--truncate",), True),
    (("--no-truncate",), False),
    (("--truncate", "false"), False),
    (("--truncate", "true"), True),
    (("--no-truncate", "--truncate"), True),  # the last one wins, as with any flag
])
def test_truncate_in_every_spelling(flags, truncate):
    assert config(*flags).engine.truncate is truncate


def test_a_switch_beats_its_variable_both_ways():
    assert config("--truncate", env={"EMBEDSERVE_TRUNCATE": "false"}).engine.truncate is True
    assert config(env={"EMBEDSERVE_TRUNCATE": "false"}).engine.truncate is False
    assert config("--no-reject-unknown-model", env={"EMBEDSERVE_REJECT_UNKNOWN_MODEL": "on"}).server \
        .reject_unknown_model is False
    assert config("--reject-unknown-model").server.reject_unknown_model is True


def test_a_bad_switch_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        config("--truncate", "maybe")
    assert "expected true/false, got 'maybe'" in capsys.readouterr().err


def test_help_groups_the_flags_with_their_variables():
    serve = build_parser({})._subparsers._group_actions[0].choices["serve"]
    text = serve.format_help()
    titles = ["model:", "batching:", "limits:", "server and security:", "logging:", "testing:"]
    at = [text.index("\n" + t + "\n") for t in titles]
    assert at == sorted(at)  # in this order
    for flag, group in (("--model", "model:"), ("--max-batch-tokens", "batching:"), ("--no-truncate", "limits:"),
                        ("--api-key", "server and security:"), ("--log-format", "logging:"),
                        ("--fault-kind", "testing:")):
        start = text.index("\n" + group + "\n")
        end = min([a for a in at if a > start] + [len(text)])
        assert f"  {flag}" in text[start:end], (flag, group)
    flat = " ".join(text.split())  # argparse wraps lines anywhere
    assert "[env: EMBEDSERVE_TRUNCATE]" in flat and "the same as --truncate false" in flat


def test_quantize_from_the_flag_the_variable_and_the_config_file(tmp_path):
    assert config().engine.model.quantize == "none"
    assert config("--quantize", "int8").engine.model.quantize == "int8"
    assert config(env={"EMBEDSERVE_QUANTIZE": "int8"}).engine.model.quantize == "int8"
    path = tmp_path / "models.toml"
    path.write_text('[[model]]\nmodel = "/m/a"\nquantize = "int8"\n\n[[model]]\nmodel = "/m/b"\n')
    c = config("--config", str(path))
    assert [c.engine.model.quantize] + [m.engine.model.quantize for m in c.more_models] == ["int8", "none"]


@pytest.mark.parametrize("flags, message", [
    (("--quantize", "int4"), "invalid choice: 'int4'"),
])
def test_a_bad_quantize_is_a_usage_error(capsys, flags, message):
    with pytest.raises(SystemExit):
        config(*flags)
    assert message in capsys.readouterr().err


def test_int8_with_a_half_precision_is_refused_naming_both():
    from embedserve.errors import ConfigError

    with pytest.raises(ConfigError, match="quantize int8 runs its activations in float32, so dtype bfloat16"):
        config("--quantize", "int8", "--dtype", "bfloat16")
    assert config("--quantize", "int8", "--dtype", "float32").engine.model.dtype == "float32"


def test_every_flag_left_out_takes_the_config_dataclasses_default():
    # Defaults are stated once, in config.py; the flags (and --help) take them from there.
    c = config("--model", "/models/m")
    assert c.engine == EngineConfig(model=ModelConfig(path="/models/m"))
    assert dataclasses.replace(c.server, served_model_name=None) == ServerConfig()


def test_help_says_a_key_is_set_never_the_key(capsys):
    env = {"EMBEDSERVE_API_KEY": "sk-hunter2-a,sk-hunter2-b", "HF_TOKEN": "hf_hunter2"}
    with pytest.raises(SystemExit):
        build_parser(env).parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "hunter2" not in text
    assert "--api-key KEY[,KEY...] accepted bearer token(s)" in text and "(set from the environment)" in text
    assert config(env=env).server.api_keys == ("sk-hunter2-a", "sk-hunter2-b")  # still used
