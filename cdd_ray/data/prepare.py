"""``cdd-ray prepare``: list a source, contaminate it (FUAD protocol), write the store.

Example::

    summary = prepare("synthetic", None, Path("data/synthetic"), noise_ratio=0.1, seed=0)
"""

from __future__ import annotations

from pathlib import Path

from cdd_ray.data.contamination import ContaminationPlan, apply_contamination, plan_contamination
from cdd_ray.data.sources import read_source
from cdd_ray.data.store import read_manifest, write_store
from cdd_ray.data.synthetic import SyntheticConfig


def prepare(
    kind: str,
    root: Path | None,
    out: Path,
    categories: list[str] | None = None,
    noise_ratio: float = 0.0,
    overlap: bool = False,
    seed: int = 0,
    resample: bool = False,
    skip_bad: bool = False,
    abnormal_dir: Path | None = None,
    mask_dir: Path | None = None,
    synthetic: SyntheticConfig | None = None,
    defect_types: tuple[str, ...] | list[str] = (),
) -> dict:
    entries = read_source(
        kind, root, categories, abnormal_dir=abnormal_dir, mask_dir=mask_dir, seed=seed, synthetic=synthetic
    )
    plan = plan_contamination(entries, noise_ratio, overlap, seed, resample, defect_types)
    reused = read_manifest(out, plan.settings())
    if reused is not None:
        settings = plan.settings() | {"defect_types": tuple(plan.defect_types)}
        plan = ContaminationPlan(**settings, injected=reused)
    summary = write_store(apply_contamination(entries, plan), out, source=kind, plan=plan, skip_bad=skip_bad)
    summary["manifest_reused"] = reused is not None
    return summary
