"""Checkpoint files of a CDD run (torch only, loaded with ``weights_only=True``).

A checkpoint directory holds:

- ``global.pt`` (written by rank 0): format version, epoch, steps done, config, domain manifest, the global
  student and its optimizer (None for memory-bank methods), its EMA (when ``optim.ema_decay`` > 0),
  and the evaluation student: the weights that scoring uses (the EMA, or the proxy's choice with
  ``eval.select=proxy``; None means the global student itself);
- ``domains_rank<r>.pt`` (one per rank that owns domain students): their weights and optimizers;
- ``memory_bank.pt`` (PatchCore and SoftPatch, rank 0): the memory bank
  (``cdd_ray.models.patchcore.memory_bank.MemoryBank``).

Ray Train merges the files that every rank reports into one checkpoint directory; on resume each
rank reads all ``domains_rank*.pt`` and keeps the students it owns now, so resuming with another
worker count works too.

Example::

    save_global(dir, global_student, optimizer, epoch, steps_done, config_dict, manifest)
    state = load_global(dir)
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch
from torch import nn

CHECKPOINT_FORMAT_VERSION = 2
GLOBAL_FILE = "global.pt"
BANK_FILE = "memory_bank.pt"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or from an incompatible version."""


def unwrap(module: nn.Module) -> nn.Module:
    return getattr(module, "module", module)


def _save(path: Path, payload: dict) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    torch.save(payload, temporary)
    temporary.replace(path)


def _load(path: Path, mmap: bool = False) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file missing")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise CheckpointError(f"{path}: damaged or not a cdd-ray checkpoint ({error})") from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a cdd-ray checkpoint (holds {type(payload).__name__})")
    version = payload.get("format_version")
    if version != CHECKPOINT_FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version}, this cdd-ray reads {CHECKPOINT_FORMAT_VERSION}"
        )
    return payload


def save_global(
    directory: Path,
    global_student: nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    epoch: int,
    steps_done: int,
    config: dict,
    manifest: dict | None = None,
    extra: dict | None = None,
) -> None:
    """``steps_done`` counts reports (one per epoch with ``alternate``; 2 x epochs with
    ``sequential``); a resumed run starts at that step. ``extra`` adds entries (EMA state, the
    evaluation student, the proxy's choice), each a tensor dict or plain values."""
    _save(
        Path(directory) / GLOBAL_FILE,
        {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "epoch": epoch,
            "steps_done": steps_done,
            "config": config,
            "domain_manifest": manifest,
            "global_student": None if global_student is None else unwrap(global_student).state_dict(),
            "global_optimizer": None if optimizer is None else optimizer.state_dict(),
            "global_ema": None,
            "evaluation_student": None,
            "selection": None,
            **(extra or {}),
        },
    )


def save_domains(
    directory: Path, rank: int, students: dict[int, nn.Module], optimizers: dict[int, torch.optim.Optimizer]
) -> None:
    if not students:
        return
    _save(
        Path(directory) / f"domains_rank{rank}.pt",
        {
            "format_version": CHECKPOINT_FORMAT_VERSION,
            "students": {k: s.state_dict() for k, s in students.items()},
            "optimizers": {k: optimizers[k].state_dict() for k in students},
        },
    )


def load_global(directory: Path, mmap: bool = False) -> dict:
    """``mmap=True`` maps the tensors instead of reading them: cheap when only the header (epoch,
    config, manifest) is needed, e.g. to check a run directory before resuming it."""
    return _load(Path(directory) / GLOBAL_FILE, mmap)


def load_domains(directory: Path) -> tuple[dict[int, dict], dict[int, dict]]:
    students: dict[int, dict] = {}
    optimizers: dict[int, dict] = {}
    for path in sorted(Path(directory).glob("domains_rank*.pt")):
        payload = _load(path)
        students.update({int(k): v for k, v in payload["students"].items()})
        optimizers.update({int(k): v for k, v in payload["optimizers"].items()})
    return students, optimizers


def checkpoints_in(run_dir: Path) -> list[Path]:
    """A run directory's complete checkpoints (those holding global.pt), oldest first. Ray Train and
    the in-process runner both name them ``checkpoint_<timestamp>``, so names sort by time."""
    return sorted(p for p in Path(run_dir).glob("checkpoint_*") if (p / GLOBAL_FILE).is_file())
