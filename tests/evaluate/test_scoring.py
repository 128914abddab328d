"""How a checkpoint's detector scores: the distance and image score its config records."""

import json
import re
from pathlib import Path

import pytest
import torch

from cdd_ray.data.domains import DOMAINS_FILE, HOLDOUT
from cdd_ray.evaluate.scoring import load_detector, read_split_arrays
from cdd_ray.models.detector import distance_scale
from cdd_ray.train.checkpoint import GLOBAL_FILE, CheckpointError
from tests.evaluate.conftest import checkpoint_of, write_run


def rewrite(checkpoint, change) -> None:
    path = checkpoint / GLOBAL_FILE
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def test_the_checkpoint_scale_and_top_fraction_make_the_score(tmp_path):
    run = write_run(tmp_path, "distillation")
    detector, config = load_detector(checkpoint_of(run), torch.device("cpu"))
    assert (config.eval.distance, config.eval.top_fraction) == ("cos_l2", 0.01)
    assert config.eval.test_time_augment == "flips" and len(detector.symmetries) == 4  # the default
    stored = torch.load(checkpoint_of(run) / GLOBAL_FILE, weights_only=True)["distance_scale"]
    assert torch.equal(detector.distance_scale, torch.tensor(stored))
    images = torch.rand(2, 3, 32, 32)
    maps, scores = detector(images)
    top = maps.flatten(1).sort(dim=1, descending=True).values[:, : int(0.01 * 32 * 32)].mean(1)
    assert torch.allclose(scores, top)
    # the scale divides each level's distances: a doubled scale halves the map
    doubled_scale = (2 * torch.tensor(stored)).tolist()
    rewrite(checkpoint_of(run), lambda state: state.update(distance_scale=doubled_scale))
    doubled, _ = load_detector(checkpoint_of(run), torch.device("cpu"))
    assert torch.allclose(doubled(images)[0], maps / 2, atol=1e-5)


def test_a_checkpoint_without_the_scale_gets_it_from_the_trained_rows_and_an_older_one_scores_as_it_ran(
    tmp_path,
):
    run = write_run(tmp_path, "distillation")
    checkpoint = checkpoint_of(run)
    named = re.escape(f"{checkpoint} (step 3)")
    rewrite(checkpoint, lambda state: state.update(distance_scale=None, steps_done=3))  # mid-run
    with pytest.warns(UserWarning, match=rf"{named}.*from the 5 images.*domains.json"):
        detector, config = load_detector(checkpoint, torch.device("cpu"))
    # the run's last step would have stored the same means, over the trained (not held-out) rows
    assignment = json.loads((run / DOMAINS_FILE).read_text())["assignment"]
    trained = sorted(sid for sid, domain in assignment.items() if domain != HOLDOUT)

    def scale_over(ids):
        images = read_split_arrays(Path(config.data.path), "train", "weave", 32, ids)["image"]
        return distance_scale(detector.teacher, detector.student, torch.from_numpy(images), batch_size=2)

    assert len(trained) == 5 and torch.allclose(detector.distance_scale, scale_over(trained), rtol=1e-5)

    # the checkpoint's own manifest (what it trained on) comes before the run directory's file
    fewer = {sid: (HOLDOUT if sid in trained[:2] else domain) for sid, domain in assignment.items()}
    rewrite(checkpoint, lambda state: state.update(domain_manifest={"assignment": fewer}))
    with pytest.warns(UserWarning, match=rf"{named}.*from the 3 images.*domain manifest"):
        detector, _ = load_detector(checkpoint, torch.device("cpu"))
    assert torch.allclose(detector.distance_scale, scale_over(trained[2:]), rtol=1e-5)

    rewrite(checkpoint, lambda state: state.update(domain_manifest=None))
    (run / DOMAINS_FILE).write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{named}.*cannot be read from .*domains.json"):
        load_detector(checkpoint, torch.device("cpu"))
    (run / DOMAINS_FILE).unlink()
    with pytest.raises(CheckpointError, match=rf"{named}.*cannot be read from .*domains.json"):
        load_detector(checkpoint, torch.device("cpu"))

    def older(state):  # written before eval.distance, eval.top_fraction and eval.test_time_augment
        for key in ("distance", "top_fraction", "test_time_augment"):
            del state["config"]["eval"][key]

    rewrite(checkpoint_of(run), older)
    detector, config = load_detector(checkpoint_of(run), torch.device("cpu"))
    assert (config.eval.distance, config.eval.top_fraction) == ("cos", 0.0)
    assert config.eval.test_time_augment == "none" and len(detector.symmetries) == 1
    assert detector.distance_scale is None
    maps, scores = detector(torch.rand(2, 3, 32, 32))
    assert torch.equal(scores, maps.flatten(1).amax(1))
