import pytest

from cdd_ray.config import ConfigError, load_config


def test_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  num_domains: 3\nobjective:\n  gating: true\n")
    config = load_config(path, ["train.num_domains=4", "optim.lr=0.001", "teacher.pretrained=false"])
    assert config.train.num_domains == 4 and config.objective.gating is True
    assert config.optim.lr == 0.001 and config.teacher.pretrained is False


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.num_domain=3", "unknown config key 'train.num_domain'"),
        ("trainer.epochs=3", "unknown config key 'trainer'"),
        ("optim.lr=-0.1", "optim.lr: must be positive"),
        ("train.num_domains=0", "train.num_domains: must be >= 1"),
        ("train.epochs=two", "train.epochs: cannot use 'two'"),
        ("objective.loss_form=cosine", "objective.loss_form: must be one of"),
        ("data.partition=magic", "data.partition: must be one of"),
        ("train=3", "train is a section"),
        ("novalue", "is not key=value"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(None, [override])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.yaml")


def test_shipped_run_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parent.parent.joinpath("sweeps").glob("*.yaml")):
        config = load_config(path)
        assert config.train.num_domains >= 1, path
