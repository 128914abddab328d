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
        ("objective.hard_share=0", "objective.hard_share: must lie in (0, 1\\]"),
        ("eval.test_time_augment=rot90", "eval.test_time_augment: must be one of"),
        ("objective.feature_jitter=-0.5", "objective.feature_jitter: must be a finite number >= 0"),
        ("objective.feature_jitter=inf", "objective.feature_jitter: must be a finite number >= 0"),
        ("objective.synthetic_anomalies=2", "objective.synthetic_anomalies: must lie in \\[0, 1\\]"),
        ("objective.augment=rot90", "objective.augment: must be one of"),
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


def test_every_shipped_yaml_loads():
    """sweeps/ holds run configs, sweep files and grid files; each must load with its own loader."""
    from pathlib import Path

    import yaml

    from cdd_ray.tune.grid import load_grid
    from cdd_ray.tune.spec import load_sweep

    files = sorted(Path(__file__).parent.parent.joinpath("sweeps").glob("*.yaml"))
    files += sorted(Path(__file__).parent.parent.joinpath("bench").glob("*.yaml"))
    assert files
    for path in files:
        keys = set(yaml.safe_load(path.read_text()))
        if "search_space" in keys:
            assert load_sweep(path).search_space, path
        elif "methods" in keys:
            assert load_grid(path).methods, path
        else:
            assert load_config(path).train.num_domains >= 1, path


def test_outlier_domain_targets_off_needs_the_outlier_partition_and_two_clean_domains():
    from cdd_ray.config import excluded_target_domains

    with pytest.raises(
        ConfigError, match="objective.outlier_domain_targets: false needs data.partition=outlier"
    ):
        load_config(None, ["objective.outlier_domain_targets=false", "train.num_domains=3"])
    with pytest.raises(ConfigError, match=r"train.num_domains >= data.outlier_domains \+ 2 = 3"):
        load_config(None, ["objective.outlier_domain_targets=false", "data.partition=outlier"])
    off = ["objective.outlier_domain_targets=false", "data.partition=outlier"]
    assert excluded_target_domains(load_config(None, [*off, "train.num_domains=3"])) == (0,)
    assert excluded_target_domains(
        load_config(None, [*off, "train.num_domains=4", "data.outlier_domains=2"])
    ) == (
        0,
        1,
    )
    assert excluded_target_domains(load_config(None, ["data.partition=outlier", "train.num_domains=3"])) == ()


def test_the_worker_engine_gets_the_excluded_target_domains():
    import torch

    from cdd_ray.models.distillation.student import student_spec
    from cdd_ray.train.worker import make_engine
    from tests.models.test_teacher import random_teacher

    teacher = random_teacher()
    spec = student_spec(teacher.channels, teacher.reductions)
    off = ["objective.outlier_domain_targets=false", "data.partition=outlier", "train.num_domains=3"]
    engine = make_engine(load_config(None, off), teacher, spec, [0, 1, 2])
    assert engine.excluded_sources == (0,)
    # a global step runs: with K = 3 and domain 0 excluded every image keeps a source
    assert engine.global_step(torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])) > 0
    assert make_engine(load_config(None, off[1:]), teacher, spec, [0, 1, 2]).excluded_sources == ()
