"""``cdd-ray export``: one file per run that scores like the Python path, without cdd-ray or timm."""

import importlib.util
import subprocess
import sys

import pytest
import torch

from cdd_ray.evaluate.export import export_run, run_exported
from cdd_ray.evaluate.scoring import load_detector
from tests.evaluate.conftest import checkpoint_of, write_run

ONNX = pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
FORMATS = ["torchscript", pytest.param("onnx", marks=ONNX)]
STANDALONE = """
import sys
sys.modules["cdd_ray"] = None  # any import of cdd-ray or timm would fail here
sys.modules["timm"] = None
import torch
path = sys.argv[1]
images = torch.rand(3, 3, 32, 32)
if path.endswith(".pt"):
    maps, scores = torch.jit.load(path)(images)
else:
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {"images": images.numpy()})
print(tuple(maps.shape), tuple(scores.shape))
"""


@pytest.mark.parametrize("method", ["distillation", "patchcore"])  # distillation with test-time flips
@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_the_python_path_and_runs_alone(tmp_path, method, fmt):
    run = write_run(tmp_path, method)
    path = export_run(run, checkpoint_of(run), fmt, run / "export")
    detector, _ = load_detector(checkpoint_of(run), torch.device("cpu"))
    images = torch.rand(5, 3, 32, 32)  # another batch size than the one exported with
    with torch.no_grad():
        expected_maps, expected_scores = detector(images)
    maps, scores = run_exported(path, images)
    assert (maps - expected_maps).abs().max() <= 1e-4
    assert torch.allclose(scores, expected_scores, atol=1e-4)
    alone = subprocess.run(
        [sys.executable, "-c", STANDALONE, str(path)], capture_output=True, text=True, timeout=300
    )
    assert alone.returncode == 0, alone.stderr[-2000:]
    assert alone.stdout.strip() == "(3, 32, 32) (3,)"
    info = (run / "export" / "export.json").read_text()
    assert '"image_threshold": 1.5' in info and f'"format": "{fmt}"' in info
