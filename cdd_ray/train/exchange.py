"""Exchange of domain students between ranks through the torch.distributed process group.

Domain k lives on rank ``k % world_size`` (round-robin when K > workers). After DST every rank needs
every domain student to build pseudo-normal targets for its shard, so each owner broadcasts the
student's parameters and buffers. Plain torch.distributed: works with gloo (CPU) and NCCL (GPU).

Example::

    students = exchange_domain_students(engine.domain_students, spec, num_domains, replicas, device)
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from cdd_ray.data.sharding import owner_of
from cdd_ray.models.distillation.student import Student, StudentSpec


def owned_domains(num_domains: int, rank: int, world_size: int) -> list[int]:
    if num_domains == 1:
        return []
    return [k for k in range(num_domains) if owner_of(k, world_size) == rank]


def exchange_domain_students(
    owned: dict[int, Student],
    spec: StudentSpec,
    num_domains: int,
    replicas: dict[int, Student],
    device: torch.device,
) -> list[Student]:
    """All K domain students on this rank; ``replicas`` caches the copies of other ranks' students."""
    distributed = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if distributed else 1
    students = []
    for k in range(num_domains):
        if k in owned:
            student = owned[k]
        else:
            if not distributed:
                raise RuntimeError(f"domain student {k} is not on this process and no process group exists")
            student = replicas.setdefault(k, Student(spec).to(device))
        if distributed and world_size > 1:
            for tensor in student.state_dict().values():
                dist.broadcast(tensor, src=owner_of(k, world_size))
        students.append(student)
    return students


def average_buffers(module: torch.nn.Module) -> None:
    """Average floating-point buffers (BatchNorm running statistics) over all ranks, in place.

    DDP keeps parameters identical on every rank but lets each rank's forward passes update its
    own running statistics; averaging them once per epoch gives every rank the same model, with
    statistics that reflect the whole training set rather than one shard.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            buffer.div_(dist.get_world_size())
