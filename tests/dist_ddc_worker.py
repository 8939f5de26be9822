"""Worker of the DDC distributed tests (tests/test_ddc_harness.py), run under torchrun with 2
processes (gloo, CPU), and the single-process reference it is compared with (importable
without torch.distributed).

    torchrun --standalone --nproc_per_node=2 tests/dist_ddc_worker.py OUT_DIR

For each (arch, base) in CASES: DDP training of a tiny HF model with ``ddc_optimizer`` for
STEPS steps, every rank on its half of the same global batch; rank 0 writes
``OUT_DIR/ddp_<arch>_<base>.pt`` (the parameters after the run). Then FSDP2 (``fully_shard``,
DTensor parameters, the optimizer built with ``model=`` an unsharded replica): the same cases,
``OUT_DIR/fsdp2_<arch>_<base>.pt`` (the gathered parameters) and ``..._local.txt`` (the
parameters whose Adam state is their local shard's); the message of
``ddc_optimizer`` on an FSDP2 model without a replica goes to ``OUT_DIR/fsdp2.txt``.
``OUT_DIR/done`` at the very end.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from equiopt import distributed as D
from equiopt.ddc import ddc_optimizer
from equiopt.train.models import ModelConfig, build_model

CASES = (("qwen3", "adam"), ("qwen3", "muon"), ("olmoe", "adam"), ("olmoe", "muon"))
FSDP2_CASES = CASES
STEPS = 4
BATCH, SEQ, VOCAB = 4, 16, 64


def model_for(arch: str) -> torch.nn.Module:
    moe = dict(num_experts=4, top_k=2) if arch == "olmoe" else {}
    mc = ModelConfig(
        arch,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        max_seq_len=SEQ,
        **moe,
    )
    return build_model(mc, seed=0)


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids[:, :-1]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))


def train(model, opt, rows: slice) -> None:
    for step in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss_of(model, batch(step)[rows]).backward()
        opt.step()


def reference_run(arch: str, base: str) -> dict[str, torch.Tensor]:
    """One process, the whole global batch."""
    model = model_for(arch)
    train(model, ddc_optimizer(model, base), slice(None))
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def run(out: Path) -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    per = BATCH // world
    for arch, base in CASES:
        model = D.wrap_model(model_for(arch), "ddp", find_unused_parameters=arch == "olmoe")
        opt = ddc_optimizer(model, base)
        assert any(g.kind == "shift" for g in opt.gauges), opt.gauges
        train(model, opt, slice(rank * per, (rank + 1) * per))
        if rank == 0:
            torch.save(
                {n: p.detach().clone() for n, p in D.unwrap(model).named_parameters()}, out / f"ddp_{arch}_{base}.pt"
            )
    for arch, base in FSDP2_CASES:  # FSDP2: DTensor parameters; plan and probes on an unsharded replica
        model = D.wrap_model(model_for(arch), "fsdp2")
        opt = ddc_optimizer(model, base, model=model_for(arch))
        assert {g.kind for g in opt.gauges} >= {"shift", "norm"}, opt.gauges
        train(model, opt, slice(rank * per, (rank + 1) * per))
        full = {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
        # parameters whose Adam state is the local shard's (stepped on their local rows)
        local = [
            n
            for n, p in model.named_parameters()
            if "exp_avg" in opt.state[p] and opt.state[p]["exp_avg"].shape != p.shape
        ]
        if rank == 0:
            torch.save(full, out / f"fsdp2_{arch}_{base}.pt")
            (out / f"fsdp2_{arch}_{base}_local.txt").write_text("\n".join(local))
    model = D.wrap_model(model_for("qwen3"), "fsdp2")
    try:
        ddc_optimizer(model, "adam")
        msg = "accepted"
    except ValueError as e:
        msg = str(e)
    if rank == 0:
        (out / "fsdp2.txt").write_text(msg)


def main(argv) -> None:
    out = Path(argv[0])
    torch.set_num_threads(1)
    D.init_from_env(timeout_s=float(os.environ.get("EQUIOPT_DIST_TIMEOUT", 90)), device="cpu")  # gloo
    run(out)
    D.barrier()
    if D.is_rank0():
        (out / "done").write_text("ok")
    D.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
    # as tests/dist_worker.py: leave without the interpreter's teardown (a joinable gloo
    # thread at C++ static teardown can abort a finished run)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
