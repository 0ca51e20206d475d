"""--config models.toml: several models with their own settings, each falling back on the flags."""

from __future__ import annotations

import pytest

from embedserve.cli import build_config, build_parser
from embedserve.errors import ConfigError


def config_for(tmp_path, text: str, *flags: str):
    path = tmp_path / "models.toml"
    path.write_text(text)
    return build_config(build_parser({}).parse_args(["serve", *flags, "--config", str(path)]))


def test_each_model_takes_its_own_settings_and_the_flags_for_the_rest(tmp_path):
    c = config_for(tmp_path, """
[[model]]
name = "mini"
model = "/models/minilm"
dtype = "bfloat16"
max_batch_tokens = 8192

[[model]]
model = "Qwen/Qwen3-Reranker-0.6B"
kind = "rerank"
revision = "abc123"
truncate = false
""", "--max-batch-requests", "64", "--dtype", "float32")
    assert c.server.served_model_name == "mini"
    assert (c.engine.model.dtype, c.engine.scheduler.max_batch_tokens, c.engine.scheduler.max_batch_requests) == (
        "bfloat16", 8192, 64)
    (rr,) = c.more_models
    assert rr.name == "Qwen/Qwen3-Reranker-0.6B"
    assert (rr.engine.model.kind, rr.engine.model.revision, rr.engine.model.dtype, rr.engine.truncate) == (
        "rerank", "abc123", "float32", False)


def test_models_from_flags_come_first(tmp_path):
    c = config_for(tmp_path, '[[model]]\nname = "two"\nmodel = "/m/two"\n', "--model", "one=/m/one")
    assert c.server.served_model_name == "one" and [m.name for m in c.more_models] == ["two"]


def test_prompts_per_model(tmp_path):
    c = config_for(tmp_path, '[[model]]\nmodel = "/m/e5"\nprompts = { query = "query: ", passage = "passage: " }\n'
                             'default_prompt_name = "query"\n\n[[model]]\nmodel = "/m/plain"\n')
    assert dict(c.engine.model.prompts) == {"query": "query: ", "passage": "passage: "}
    assert c.engine.model.default_prompt_name == "query"
    (plain,) = c.more_models
    assert (plain.engine.model.prompts, plain.engine.model.default_prompt_name) == ((), None)


@pytest.mark.parametrize("text, message", [
    ('[[model]]\nmodel = "/m"\nprompts = "query: "\n', "model 1 \\(/m\\): prompts must be a table"),
    ('[[model]]\nmodel = "/m"\nprompts = { query = 3 }\n', "prompts must map names to texts"),
    ('[[model]]\nmodel = "/m"\ncolour = "blue"\n', "unknown keys colour"),
    ('[[model]]\nname = "x"\n', "has no 'model'"),
    ('[[model]]\nmodel = "/m"\ndtype = "int3"\n', "model 1 \\(/m\\): dtype must be one of"),
    ('[[model]]\nmodel = "/m"\nmax_batch_tokens = 0\n', "max_batch_tokens must be a positive integer"),
    ("model = 3\n", "no \\[\\[model\\]\\] tables"),
    ("[[model]\n", "models.toml"),
])
def test_a_bad_file_is_an_error_that_names_the_model_and_key(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        config_for(tmp_path, text)


@pytest.mark.parametrize("line, message", [
    ('truncate = "false"', 'truncate must be true or false, got \'false\' (str)'),
    ("max_queue = true", "max_queue must be an integer, got True (bool)"),
    ("max_batch_tokens = 1.5", "max_batch_tokens must be an integer, got 1.5 (float)"),
    ('dtype = 16', "dtype must be a string, got 16 (int)"),
    ("name = 3", "name must be a string, got 3"),
])
def test_config_values_are_type_checked_naming_the_model_and_the_key(tmp_path, line, message):
    with pytest.raises(ConfigError) as e:
        config_for(tmp_path, f'[[model]]\nmodel = "/models/minilm"\n{line}\n')
    assert f"model 1 ('/models/minilm'): {message}" in e.value.message
