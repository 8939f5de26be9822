"""CUDA + NCCL smoke check of equiopt.distributed on one GPU (not part of the CPU test suite).

    PYTHONPATH=src torchrun --standalone --nproc_per_node=1 tests/dist_cuda_smoke.py [CKPT_DIR]

One rank, so every shard holds whole matrices (the ``local`` path): this checks the device
handling (NCCL init bound to the local GPU, DTensor parameters on CUDA, the finite-flag and
gradient-norm all-reduces, bf16 polar on CUDA, DCP save/load on GPU), not the collectives
of the cut-matrix paths (those are covered on CPU with gloo by tests/test_distributed.py).
For each of DDP and FSDP2 and each preset: 3 steps equal the unwrapped single-GPU run, and a
checkpoint-resume continues identically. Prints one line per check and exits non-zero on
failure.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from equiopt import distributed as D


def tiny_qwen3(device):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = "eager"
    return Qwen3ForCausalLM(cfg).float().to(device)


def batch(step, device):
    g = torch.Generator().manual_seed(step)
    return torch.randint(0, 512, (4, 33), generator=g).to(device)


def step_once(model, opt, step, device):
    idx = batch(step, device)
    opt.zero_grad(set_to_none=True)
    logits = model(idx[:, :-1]).logits
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1)).backward()
    gn = D.grad_norm(model.parameters())
    opt.step()
    return gn


def params_of(model):
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in D.unwrap(model).named_parameters()
    }


def main(out: Path) -> int:
    info = D.init_from_env()
    assert info.device.type == "cuda" and info.backend == "nccl", info
    ok = True
    for preset in ("adamw", "muon", "paper"):
        ref = tiny_qwen3(info.device)
        ropt = D.build(ref, preset)
        ref_norms = [step_once(ref, ropt, s, info.device) for s in range(3)]
        want = params_of(ref)
        for mode in ("ddp", "fsdp2"):
            model = D.wrap_model(tiny_qwen3(info.device), mode, info)
            opt = D.build(model, preset)
            norms = [step_once(model, opt, s, info.device) for s in range(3)]
            got = params_of(model)
            d = max((got[n] - want[n]).abs().max().item() for n in want)
            dn = max(abs(a - b) / b for a, b in zip(norms, ref_norms))
            paths = set()
            if mode == "fsdp2":
                for g in opt.param_groups:
                    if g["map"] != "adamw":
                        paths |= set(D.param_paths(opt, g).values())
            good = d <= 1e-6 and dn <= 1e-6
            ok &= good
            print(
                f"{'ok ' if good else 'BAD'} {mode:5s} {preset:5s} max|diff| {d:.1e} grad-norm rel {dn:.1e} "
                f"paths {sorted(paths)}",
                flush=True,
            )
            ck = out / f"ck_{mode}_{preset}"
            D.save_checkpoint(ck, model, opt, extra={"step": 3})
            cont = [step_once(model, opt, s, info.device) for s in range(3, 5)]
            model2 = D.wrap_model(tiny_qwen3(info.device), mode, info)
            opt2 = D.build(model2, preset)
            extra, _ = D.load_checkpoint(ck, model2, opt2)
            cont2 = [step_once(model2, opt2, s, info.device) for s in range(extra["step"], 5)]
            a, b = params_of(model), params_of(model2)
            same = all(torch.equal(a[n], b[n]) for n in a) and cont == cont2
            ok &= same
            print(f"{'ok ' if same else 'BAD'} {mode:5s} {preset:5s} checkpoint-resume identical: {same}", flush=True)
    D.cleanup()
    return 0 if ok else 1


if __name__ == "__main__":
    import tempfile

    sys.exit(main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="equiopt-cuda-"))))
