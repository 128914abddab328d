"""Faults survived and refused: a NaN loss, a sequential run stopped during aggregation and resumed,
a run directory that does not fit, Ray's failure summaries.

A worker killed mid-epoch (Ray Train restarts the group from the last checkpoint) is tested on the
two-node cluster, tests/test_multinode.py, after a killed driver's resume."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from cdd_ray.config import load_config
from cdd_ray.train.checkpoint import CHECKPOINT_FORMAT_VERSION, GLOBAL_FILE, checkpoints_in, load_global
from cdd_ray.train.run import (
    PROGRESS_FILE,
    RAY_TRAIN_SNAPSHOT,
    RUN_FILE,
    RunDirError,
    _failure_summary,
    check_run_dir,
    latest_checkpoint,
    train,
)
from tests.conftest import TWO_WORKER_RUN, count_target_passes, read_progress, tiny_overrides


def checkpoint_epochs(run_dir: Path) -> list[int]:
    return [
        load_global(p)["epoch"] for p in sorted(run_dir.glob("checkpoint_*")) if (p / GLOBAL_FILE).is_file()
    ]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def test_non_finite_loss_names_epoch_stage_and_domain_and_keeps_the_last_good_checkpoint(
    ray_session, tiny_store, tmp_path
):
    # in-process: the loss check, the message and the kept checkpoint are the run's, not Ray's
    # (how Ray's worker failures are summarized is tested below without a run)
    overrides = {**TWO_WORKER_RUN, "ray.num_workers": 0, "train.teacher_cache": "false", "name": "nan"}
    config = load_config(None, tiny_overrides(tiny_store, tmp_path / "runs", **overrides))
    fault = {"action": "nan", "rank": 0, "stage": "dst", "step": 1, "batch": 0, "marker": str(tmp_path / "m")}
    with pytest.raises(RuntimeError, match=r"epoch 2: loss is nan in DST of domain 0") as caught:
        train(config, fault=fault)
    run_dir = tmp_path / "runs" / "nan"
    assert str(run_dir) in str(caught.value)
    assert checkpoint_epochs(run_dir) == [1]
    assert load_global(latest_checkpoint(run_dir))["epoch"] == 1


def test_a_sequential_run_stopped_during_aggregation_resumes_and_refills_its_target_cache(
    tiny_store, tmp_path, monkeypatch
):
    # Under `sequential` the first aggregation step fills the pseudo-normal target cache and the
    # later ones read it. A run stopped after its second aggregation step resumes in a new engine
    # with an empty cache: the resumed step must compute its targets again, not read unfilled
    # slots, and end where the uninterrupted run ended (to float rounding on the CPU: the targets
    # now come from other batches). The stop is close to what a crash during the last step leaves:
    # its checkpoint and its progress line gone.
    run = {
        "train.num_domains": 2,
        "train.schedule": "sequential",
        "train.epochs": 3,
        "train.checkpoint_every": 1,
        "ray.num_workers": 0,
        "ray.use_gpu": "false",
    }
    target_passes = count_target_passes(monkeypatch)
    config = run_config(tmp_path, tiny_store, name="cut", **run)
    run_dir, whole, _ = train(config)
    whole_state = load_global(whole)
    whole_reports = read_progress(run_dir)
    # steps 1-3 train the domain students, 4-6 the global one, the cache filled in step 4 only
    assert [r["stage"] for r in whole_reports] == ["dst"] * 3 + ["global"] * 3
    assert all(r["target_cache_mb"] > 0 for r in whole_reports[3:])
    one_step_of_targets = len(target_passes)
    assert one_step_of_targets > 0
    target_passes.clear()
    assert len(checkpoints_in(run_dir)) == 2  # session.KEEP_CHECKPOINTS: steps 5 and 6
    shutil.rmtree(whole)
    assert load_global(latest_checkpoint(run_dir))["steps_done"] == 5
    (run_dir / PROGRESS_FILE).write_text("".join(f"{json.dumps(r)}\n" for r in whole_reports[:5]))

    _, resumed, _ = train(config)
    assert len(target_passes) == one_step_of_targets  # step 6 computed its targets again
    reports = read_progress(run_dir)
    assert [r["step"] for r in reports] == [1, 2, 3, 4, 5, 6]
    assert reports[-1]["target_cache_mb"] == whole_reports[-1]["target_cache_mb"]
    assert reports[-1]["loss_global"] == pytest.approx(whole_reports[-1]["loss_global"], rel=1e-5)
    a, b = whole_state["global_student"], load_global(resumed)["global_student"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), f"{key} differs"


def run_config(tmp_path: Path, tiny_store: Path, **extra):
    return load_config(None, tiny_overrides(tiny_store, tmp_path / "runs", **extra))


def test_a_run_directory_with_other_settings_or_format_is_refused_by_name(tmp_path, tiny_store):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2}))
    recorded = json.loads((run_dir / RUN_FILE).read_text())
    assert recorded["config"]["train"]["num_domains"] == 2
    # Same settings, more epochs: allowed (that is how a run is extended).
    check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2, "train.epochs": 5}))
    with pytest.raises(RunDirError, match=r"train\.num_domains: 2 there, 3 here"):
        check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 3}))
    # A run recorded before the student section existed had the default student.
    (run_dir / RUN_FILE).write_text(json.dumps({**recorded, "config": {**recorded["config"], "student": {}}}))
    check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2}))
    with pytest.raises(RunDirError, match=r"student\.embedding_stride: 2 there, 1 here"):
        check_run_dir(
            run_dir,
            run_config(tmp_path, tiny_store, **{"train.num_domains": 2, "student.embedding_stride": 1}),
        )
    # width_factor null builds the backbone's width (1 here): an explicit 1 is the same student.
    check_run_dir(
        run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2, "student.width_factor": 1})
    )
    with pytest.raises(RunDirError, match=r"student\.width_factor: 1 there, 2 here"):
        check_run_dir(
            run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2, "student.width_factor": 2})
        )
    unrecorded = {**recorded["config"], "data": {**recorded["config"]["data"]}}
    del unrecorded["data"]["shuffle_window"]
    (run_dir / RUN_FILE).write_text(json.dumps({**recorded, "config": unrecorded}))
    with pytest.raises(RunDirError, match=r"data\.shuffle_window: 2048 there, 64 here"):
        check_run_dir(
            run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2, "data.shuffle_window": 64})
        )

    (run_dir / RUN_FILE).write_text(json.dumps({**recorded, "format_version": 0}))
    with pytest.raises(RunDirError, match=rf"{run_dir}.*run format 0"):
        check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2}))

    (run_dir / RUN_FILE).write_text(json.dumps(recorded))
    old = run_dir / "checkpoint_2026-01-01_00-00-00.000000"
    old.mkdir()
    (run_dir / RAY_TRAIN_SNAPSHOT).write_text("{}")  # checkpoints that Ray Train wrote
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION + 1}, old / GLOBAL_FILE)
    version = CHECKPOINT_FORMAT_VERSION + 1
    with pytest.raises(RunDirError, match=rf"cannot resume {run_dir}.*checkpoint format {version}"):
        check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2}))

    # A sequential run cannot be extended: its plan has every DST epoch before aggregation.
    sequential = {"train.num_domains": 2, "train.schedule": "sequential"}
    seq_dir = tmp_path / "seq"
    seq_dir.mkdir()
    check_run_dir(seq_dir, run_config(tmp_path, tiny_store, **sequential))
    (seq_dir / "checkpoint_2026-01-01_00-00-00.000000").mkdir()
    torch.save(
        {"format_version": CHECKPOINT_FORMAT_VERSION},
        seq_dir / "checkpoint_2026-01-01_00-00-00.000000" / GLOBAL_FILE,
    )
    with pytest.raises(RunDirError, match=r"written in-process \(ray.num_workers=0\)"):
        check_run_dir(seq_dir, run_config(tmp_path, tiny_store, **sequential))
    check_run_dir(seq_dir, run_config(tmp_path, tiny_store, **sequential, **{"ray.num_workers": 0}))
    (seq_dir / RAY_TRAIN_SNAPSHOT).write_text("{}")
    check_run_dir(seq_dir, run_config(tmp_path, tiny_store, **sequential))  # same epochs: resumes
    with pytest.raises(
        RunDirError, match=r"train\.epochs: 1 there, 3 here \(a `sequential` run cannot be extended"
    ):
        check_run_dir(seq_dir, run_config(tmp_path, tiny_store, **sequential, **{"train.epochs": 3}))

    (old / GLOBAL_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(RunDirError, match=rf"cannot resume {run_dir}.*{GLOBAL_FILE}: damaged"):
        check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2}))

    # A run directory from before run.json existed is judged by its last checkpoint's config.
    (run_dir / RUN_FILE).unlink()
    torch.save({"format_version": CHECKPOINT_FORMAT_VERSION, "config": recorded["config"]}, old / GLOBAL_FILE)
    with pytest.raises(RunDirError, match=r"train\.num_domains: 2 there, 4 here"):
        check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 4}))
    assert not (run_dir / RUN_FILE).exists()
    check_run_dir(run_dir, run_config(tmp_path, tiny_store, **{"train.num_domains": 2}))
    assert json.loads((run_dir / RUN_FILE).read_text())["config"] == recorded["config"]


def test_worker_failures_are_summarized_by_their_last_lines():
    class WorkerGroupFailure(Exception):
        worker_failures = {
            1: RuntimeError(
                "Traceback ...\n  File x\nNonFiniteLossError: epoch 2: loss is nan in DST of domain 1"
            ),
            0: RuntimeError("Traceback ...\nNonFiniteLossError: epoch 2: loss is nan in DST of domain 0"),
        }

    summary = _failure_summary(WorkerGroupFailure("2 workers failed"))
    assert summary == (
        "rank 0: NonFiniteLossError: epoch 2: loss is nan in DST of domain 0; "
        "rank 1: NonFiniteLossError: epoch 2: loss is nan in DST of domain 1"
    )
    assert _failure_summary(ValueError("first\nlast line")) == "last line"
