"""Config files, overrides and values that cannot work: one clear error, never a crash."""

from __future__ import annotations

import json

import pytest

from mlxgpt.cli import main
from mlxgpt.config import ConfigError, load_train_config, parse_overrides, read_config_file
from mlxgpt.sampling import MAX_SEED

RANGE = f"from 0 to {MAX_SEED}"


def run(capsys, *argv):
    code = main(list(argv))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("content", ["[1, 2]", '"max_iters"', "3", "null"])
def test_json_config_that_is_not_an_object(tmp_path, capsys, content):
    path = tmp_path / "cfg.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="must hold settings by name"):
        read_config_file(path)
    code, err = run(capsys, "train", "--config", str(path))
    assert code == 2 and err.startswith("error: config file") and "Traceback" not in err


@pytest.mark.parametrize(
    "items",
    [
        ["model=3", "model.n_layer=2"],
        ["model.n_layer=2", "model=3"],
        ["max_iters=5", "max_iters.x=1"],
        ["model.n_layer=2", "model.n_layer.deep=1"],
    ],
)
def test_a_key_given_a_value_and_sub_keys_is_an_error(items, capsys, tmp_path):
    with pytest.raises(ConfigError, match="is given a value .* and settings inside it"):
        parse_overrides(items)
    code, err = run(capsys, "train", "--out-dir", str(tmp_path), *items)
    assert code == 2 and "set one or the other" in err


def test_config_file_value_and_override_sub_keys_conflict(tmp_path):
    path = tmp_path / "cfg.toml"
    path.write_text("model = 3\n")
    with pytest.raises(ConfigError, match=r"model is given a value \(model=3\)"):
        load_train_config(path, parse_overrides(["model.n_layer=2"]))


@pytest.mark.parametrize("item", ["=3", "model.=2", ".x=1"])
def test_override_with_an_empty_key(item):
    with pytest.raises(ConfigError, match="empty key name"):
        parse_overrides([item])


def test_later_overrides_of_the_same_key_still_win():
    assert parse_overrides(["max_iters=5", "model.n_layer=1", "max_iters=7", "model.n_head=2"]) == {
        "max_iters": "7",
        "model": {"n_layer": "1", "n_head": "2"},
    }


def test_stop_at_after_max_iters_is_an_error():
    with pytest.raises(ConfigError, match=r"stop_at \(600\) is after max_iters \(500\)"):
        load_train_config(None, {"max_iters": 500, "stop_at": 600})
    assert load_train_config(None, {"max_iters": 500, "stop_at": 500}).stop_at == 500


@pytest.mark.parametrize("key", ["data", "out_dir"])
@pytest.mark.parametrize("value", ["", "  "])
def test_empty_paths_are_errors(key, value, capsys):
    with pytest.raises(ConfigError, match=f"{key} is empty"):
        load_train_config(None, {key: value})
    code, err = run(capsys, "train", f"{key}={value}")
    assert code == 2 and f"{key} is empty: give a path" in err


@pytest.mark.parametrize("seed", [-1, MAX_SEED + 1, 100_000_000_000_000])
def test_training_seed_outside_the_range(seed, capsys, tmp_path):
    with pytest.raises(ConfigError, match=f"seed must be a whole number {RANGE}"):
        load_train_config(None, {"seed": seed})
    code, err = run(capsys, "train", "--out-dir", str(tmp_path), f"seed={seed}")
    assert code == 2 and RANGE in err
    assert load_train_config(None, {"seed": MAX_SEED}).seed == MAX_SEED


@pytest.mark.parametrize("command", [["train"], ["generate", "ckpt"]])
@pytest.mark.parametrize("seed", ["-1", "100000000000000"])
def test_seed_flags_outside_the_range(command, seed, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--seed", seed])
    assert info.value.code == 2
    assert f"--seed: must be a whole number {RANGE}" in capsys.readouterr().err


def test_json_config_with_every_key_still_loads(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(load_train_config().to_dict()))
    assert load_train_config(path) == load_train_config()
