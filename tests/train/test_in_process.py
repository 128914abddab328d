"""In-process runs (ray.num_workers=0) and memory-bank methods through the same driver as Ray Train.

The in-process runner must be the same run as a Ray Train one, not a second implementation: a
one-worker TorchTrainer run (reading its rows from the object store) and an in-process run (from
the Parquet store) of the same config end with the same weights, and
a memory bank gathered from two workers equals the one built in one process.
"""

import os
import subprocess
import sys

import pytest
import torch

from cdd_ray.config import load_config
from cdd_ray.evaluate.predict import predict_images
from cdd_ray.models.patchcore.memory_bank import MemoryBank
from cdd_ray.train.checkpoint import BANK_FILE, checkpoints_in, load_global
from cdd_ray.train.run import RunDirError, evaluate, read_metrics, train
from tests.conftest import read_progress, tiny_overrides
from tests.data.trees import rgb, write_png
from tests.train.test_distributed import read_trace


def config_for(store, storage, **extra):
    return load_config(None, tiny_overrides(store, storage, **extra))


def test_in_process_run_equals_a_one_worker_ray_train_run_and_resumes_in_process(
    ray_session, tiny_store, tmp_path
):
    run = {"train.num_domains": 2, "train.schedule": "alternate", "train.epochs": 1, "optim.ema_decay": 0.5}
    in_process = config_for(tiny_store, tmp_path / "runs", name="here", **run, **{"ray.num_workers": 0})
    # the Ray Train worker reads its rows from its dataset in the object store, the in-process run
    # from the Parquet store itself: the same batches either way
    one_worker = config_for(
        tiny_store, tmp_path / "runs", name="ray", **run, **{"ray.num_workers": 1, "ray.cpus_per_worker": 1}
    )
    here_dir, here_checkpoint, here_metrics = train(in_process)
    _, ray_checkpoint, _ = train(one_worker)
    here, there = load_global(here_checkpoint), load_global(ray_checkpoint)
    for key in ("global_student", "evaluation_student", "global_ema"):
        assert here[key].keys() == there[key].keys()
        for name, tensor in here[key].items():
            if torch.is_tensor(tensor):
                assert torch.equal(tensor, there[key][name]), f"{key}.{name} differs"
    assert here["distance_scale"] == there["distance_scale"] and len(here["distance_scale"]) == 3
    # the workers' scoring and a later `cdd-ray evaluate` of the same checkpoint agree
    written = read_metrics(here_dir)
    assert written["checkpoint"] == str(here_checkpoint)
    again = evaluate(in_process, here_dir, here_checkpoint)
    assert again["image_auroc"] == pytest.approx(written["image_auroc"], abs=1e-9)
    assert here_metrics["image_auroc"] == pytest.approx(written["image_auroc"], abs=1e-9)

    # the same name continues in-process from the newest checkpoint; two checkpoints are kept
    longer = config_for(
        tiny_store, tmp_path / "runs", name="here", **{**run, "train.epochs": 3}, **{"ray.num_workers": 0}
    )
    trace = tmp_path / "trace"
    trace.mkdir()
    _, last, _ = train(longer, trace_dir=str(trace))
    steps = {e["step"] for e in read_trace(trace)}
    assert steps == {1, 2}, f"the resumed run re-ran steps {sorted(steps)}"
    reports = read_progress(here_dir)
    assert [r["epoch"] for r in reports] == [1, 2, 3]
    assert load_global(last)["epoch"] == 3 and len(checkpoints_in(here_dir)) == 2
    with pytest.raises(RunDirError, match="written in-process"):
        train(config_for(tiny_store, tmp_path / "runs", name="here", **{**run, "train.epochs": 4}))


@pytest.mark.parametrize("method", ["softpatch"])  # its bank path is PatchCore's plus denoising
def test_memory_bank_from_two_workers_equals_the_in_process_one_and_predict_reloads_it(
    ray_session, tiny_store, tmp_path, method
):
    extra = {"method": method, "memory_bank.outlier_neighbors": 3}
    two = config_for(tiny_store, tmp_path / "runs", name="two", **extra)
    here = config_for(tiny_store, tmp_path / "runs", name="here", **extra, **{"ray.num_workers": 0})
    two_dir, two_checkpoint, metrics = train(two)
    _, here_checkpoint, _ = train(here)
    gathered = MemoryBank.load(two_checkpoint / BANK_FILE)
    local = MemoryBank.load(here_checkpoint / BANK_FILE)
    # the same patches in the same order; the values agree to float rounding (the two workers'
    # batches differ from the single process's, and convolutions round per batch shape)
    assert gathered.features.shape == local.features.shape
    assert torch.allclose(gathered.features, local.features, atol=1e-5)
    assert (gathered.weights is None) == (method == "patchcore")
    if gathered.weights is not None:
        assert torch.allclose(gathered.weights, local.weights, atol=1e-4)
    assert metrics["bank_coreset_size"] == len(gathered.features)
    assert 0 <= read_metrics(two_dir)["image_auroc"] <= 1

    paths = [
        write_png(tmp_path / "cam_a" / "0001.png", rgb(1, 40)),
        write_png(tmp_path / "new.png", rgb(2, 40)),
    ]
    rows = predict_images(two_dir, two_checkpoint, paths, tmp_path / "predictions")
    assert len(rows) == 2 and all(row["score"] > 0 for row in rows)


def test_an_in_process_run_on_a_machine_without_ray_starts_none(tiny_store, tmp_path):
    """`cdd-ray train ray.num_workers=0` with a random partition: trained, scored and no Ray started."""
    script = (
        "import sys, ray\n"
        "from cdd_ray.cli import main\n"
        "code = main(['train', *sys.argv[1:]])\n"
        "print('RAY_STARTED', ray.is_initialized())\n"
        "sys.exit(code)\n"
    )
    overrides = tiny_overrides(tiny_store, tmp_path / "runs", name="alone", **{"ray.num_workers": 0})
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", script, *overrides, "train.num_domains=2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RAY_STARTED False" in done.stdout
    assert 0 <= read_metrics(tmp_path / "runs" / "alone")["image_auroc"] <= 1


def test_the_input_augmentation_knobs_reach_the_run_loop(tiny_store, tmp_path):
    """`cdd-ray train`'s loop (here in-process, as each Ray Train rank runs it) trains other weights
    with feature jitter and pasted patches on, and with transformed images, and the same ones again
    for the same seed."""
    base = {"ray.num_workers": 0, "train.num_domains": 2, "eval.score_test": "false"}
    knobs = {**base, "objective.feature_jitter": 0.5, "objective.synthetic_anomalies": 0.5}
    flipped = {**base, "objective.augment": "d4"}
    trained = {
        name: train(config_for(tiny_store, tmp_path / name, name=name, **extra))
        for name, extra in (("plain", base), ("augmented", knobs), ("again", knobs), ("d4", flipped))
    }
    weights = {
        name: load_global(checkpoint)["global_student"] for name, (_, checkpoint, _) in trained.items()
    }
    # transformed images leave nothing for the teacher-feature cache to serve: none is filled
    assert trained["plain"][2]["teacher_cache_mb"] > 0 and trained["d4"][2]["teacher_cache_mb"] == 0
    for name in ("augmented", "d4"):
        assert any(not torch.equal(weights["plain"][k], weights[name][k]) for k in weights["plain"]), name
    assert all(torch.equal(weights["augmented"][k], weights["again"][k]) for k in weights["plain"])
