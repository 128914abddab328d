"""``cdd-ray export``: a run's detector as one file that scores images without cdd-ray installed.

The exported module is the run's detector (``cdd_ray.models.detector``): teacher, global student or
memory bank, anomaly map and image score, in one graph. Input: float32 images (B, 3, S, S) in
[0, 1] at the run's ``data.image_size`` S (normalization is inside); outputs: anomaly maps (B, S, S)
and image scores (B,).

- ``torchscript`` (``model.pt``, ``torch.jit.trace``): ``torch.jit.load(path)(images)``; needs torch
  only.
- ``onnx`` (``model.onnx``, ``torch.onnx.export``, dynamic batch size): runs in onnxruntime (the
  ``export`` extra: onnx, onnxscript, onnxruntime).

Beside the model, ``export.json`` records the image size, the decision thresholds of the evaluated
run (when there are any) and the maximum absolute map difference against the Python path that the
export was checked with. The files are written under temporary names and renamed.

Example::

    path = export_run(run_dir, checkpoint_dir, "onnx", out_dir)
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from cdd_ray.data.store import write_json
from cdd_ray.evaluate.scoring import METRICS_FILE, load_detector

FORMATS = ("torchscript", "onnx")
FILES = {"torchscript": "model.pt", "onnx": "model.onnx"}
PARITY_TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export failed or does not reproduce the Python path; the message says which."""


class _Outputs(torch.nn.Module):
    """The detector with plain tensor outputs (what tracing and ONNX need)."""

    def __init__(self, detector: torch.nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        maps, scores = self.detector(images)
        return maps, scores


def _thresholds(run_dir: Path) -> dict:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return {}
    per_category = json.loads(path.read_text()).get("per_category", {})
    keys = ("image_threshold", "pixel_threshold")
    return {c: {k: v[k] for k in keys if k in v} for c, v in per_category.items() if "image_threshold" in v}


def run_exported(path: Path, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Maps and scores from an exported file, through torch.jit or onnxruntime."""
    if Path(path).suffix == ".pt":
        module = torch.jit.load(str(path))
        with torch.no_grad():
            return module(images)
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    maps, scores = session.run(None, {session.get_inputs()[0].name: images.numpy()})
    return torch.from_numpy(maps), torch.from_numpy(scores)


def export_run(run_dir: Path, checkpoint_dir: Path, fmt: str, out: Path, check_images: int = 4) -> Path:
    """Export, then check parity on ``check_images`` random images; returns the model file's path.
    Raises ExportError when the exported maps differ from the Python path by more than 1e-4."""
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {FORMATS}, got {fmt!r}")
    detector, config = load_detector(checkpoint_dir, torch.device("cpu"))
    module = _Outputs(detector).eval()
    size = config.data.image_size
    example = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = out / FILES[fmt]
    with tempfile.TemporaryDirectory(dir=out) as staging:
        staged = Path(staging) / target.name
        with torch.no_grad():
            if fmt == "torchscript":
                torch.jit.trace(module, example, check_trace=False).save(str(staged))
            else:
                torch.onnx.export(
                    module,
                    (example,),
                    str(staged),
                    input_names=["images"],
                    output_names=["anomaly_maps", "image_scores"],
                    dynamic_shapes={"images": {0: torch.export.Dim("batch", min=1, max=1024)}},
                    dynamo=True,
                    external_data=False,  # one file, weights inside
                )
        check = torch.rand(check_images, 3, size, size, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected_maps, expected_scores = module(check)
        try:
            maps, scores = run_exported(staged, check)
        except Exception as error:  # onnxruntime and torch.jit raise their own error types
            raise ExportError(
                f"the {fmt} export does not run on a batch of {check_images}: {error}"
            ) from error
        difference = float((maps - expected_maps).abs().max())
        if difference > PARITY_TOLERANCE or not torch.allclose(
            scores, expected_scores, atol=PARITY_TOLERANCE
        ):
            raise ExportError(
                f"the {fmt} export differs from the Python path (max map difference {difference:.2e})"
            )
        staged.replace(target)
    write_json(
        out / "export.json",
        {
            "format": fmt,
            "file": target.name,
            "image_size": size,
            "input": "float32 images (B, 3, S, S) in [0, 1]",
            "outputs": ["anomaly_maps (B, S, S)", "image_scores (B,)"],
            "method": config.method,
            "thresholds": _thresholds(run_dir),
            "max_map_difference": difference,
            "checkpoint": str(checkpoint_dir),
        },
    )
    return target
