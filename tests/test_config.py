import pytest

from dimec.config import RunConfig, apply_overrides, load_run_config
from dimec.errors import ConfigError


def test_yaml_file_and_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  task: sst2\n  max_samples: 100\ntrain:\n  epochs: 2\n")
    cfg = load_run_config(path, ["train.epochs=4", "model.exit_layers=[4,6,12]", "cost.lambda_=0.01"])
    assert cfg.data.task == "sst2" and cfg.data.max_samples == 100
    assert cfg.train.epochs == 4 and cfg.model.exit_layers == (4, 6, 12) and cfg.cost.lambda_ == 0.01
    assert cfg.calibration.variability == "variance"  # untouched defaults stay


def test_exponent_floats_without_a_dot(tmp_path):
    # YAML 1.1 reads 1e-4 as a string; a float setting must still take it, from a file and from --set
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  learning_rate: 3e-5\n")
    assert load_run_config(path).train.learning_rate == 3e-5
    assert load_run_config(None, ["train.learning_rate=1e-4"]).train.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="train.learning_rate must be of type float"):
        load_run_config(None, ["train.learning_rate=fast"])


def test_save_load_round_trip(tmp_path):
    cfg = load_run_config(None, ["calibration.alpha_grid=[0.6,0.7]", "data.split_ratios=[0.7,0.15,0.15]"])
    cfg.save(tmp_path / "config.json")
    assert RunConfig.load(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("overrides, message", [
    (["train.epochs=two"], "train.epochs must be of type int"),
    (["train.nope=1"], "unknown config key"),
    (["nosection.key=1"], "unknown config key"),
    (["model.exit_layers=[1,2]"], "must have 3 values"),
    (["epochs=1"], "bad override"),
])
def test_bad_settings_are_clear(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, overrides)


def test_bad_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_run_config(tmp_path / "bad.yaml")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="mapping"):
        load_run_config(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="not found"):
        load_run_config(tmp_path / "missing.yaml")


def test_overrides_do_not_mutate_input():
    raw = {"train": {"epochs": 1}}
    apply_overrides(raw, ["train.epochs=5"])
    assert raw == {"train": {"epochs": 1}}


def test_serving_settings_are_declared_listed_and_checked():
    """The client's fleet settings are declared like the run's (serving/phone/settings.py): listed by
    `dimec settings client`, checked by the same path."""
    import pytest

    from dimec.cli import main
    from dimec.errors import ConfigError
    from dimec.serving.phone.settings import FleetClientSettings

    assert FleetClientSettings().check().policy().min_mobile_confidence == 0.6
    with pytest.raises(ConfigError, match="2 bad settings"):
        FleetClientSettings(budget_window=0, trusted=("moon",)).check()
    assert main(["settings", "client"]) == 0
