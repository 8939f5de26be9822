"""Worker of tests/test_distributed.py (run under torchrun, 2 processes, gloo on CPU) and the
single-process references it is compared with (importable without torch.distributed).

    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py maps OUT_DIR
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py train OUT_DIR
    torchrun --standalone --nproc_per_node=2 tests/dist_worker.py resume OUT_DIR

Each writes ``OUT_DIR/<scenario>.pt`` from rank 0 (full parameters after the run, or a dict
of comparisons) and ``OUT_DIR/done-<command>`` at the very end.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from equiopt import distributed as D  # noqa: E402
from equiopt.layouts import Layout  # noqa: E402
from equiopt.optimizer import EquiOptimizer  # noqa: E402
from equiopt.presets import DEFAULTS  # noqa: E402

from plain_gpt import FUSED_LAYOUTS, PlainGPT  # noqa: E402

PRESETS = ("adamw", "muon", "paper")
MODES = ("ddp", "fsdp2")
STEPS = 3
CKPT_STEP = 2  # train: save after this step, then continue to CKPT_STEP + RESUME_STEPS
RESUME_STEPS = 2
VOCAB = 33  # odd: uneven embedding / head shards


# =========================================================================================
# map-level cases: every layout x every map, synthetic gradients
# =========================================================================================
# (name, storage shape, layout). World size 2 -> torch.chunk shards:
LAYOUT_CASES = [
    ("plain_uneven", (33, 16), Layout()),  # 17 / 16 rows
    ("row_vector", (1, 16), Layout()),  # rank 1 holds an empty shard
    ("two_rows", (2, 16), Layout()),  # one row each
    ("heads_out_cut", (24, 16), Layout(heads=3, head_axis="out")),  # 12/12 rows cut head 1
    ("heads_out_aligned", (32, 16), Layout(heads=4, head_axis="out")),  # 16/16 = 2 heads each
    ("heads_in", (16, 24), Layout(heads=3, head_axis="in")),  # o_proj: rows cut every head
    ("fused3_concat", (15, 16), Layout(fused=3)),  # parts of 5 rows, 8/7 split cuts part 1
    ("fused2_interleaved", (22, 16), Layout(fused=2, interleaved=True)),
    ("transposed", (17, 10), Layout(transposed=True)),  # storage [in, out]
    ("transposed_heads_in", (18, 10), Layout(transposed=True, heads=3, head_axis="in")),
    ("stacked_odd", (3, 10, 7), Layout(stacked=True)),  # E = 3: 2 / 1 experts
    ("stacked_T_fused_il", (3, 7, 20), Layout(stacked=True, transposed=True, fused=2, interleaved=True)),
    ("stacked_one", (1, 6, 5), Layout(stacked=True)),  # E = 1: rank 1 empty
]

# map specs (param_group hyperparameters on top of DEFAULTS)
MAP_SPECS = {
    "identity": {"map": "identity"},
    "row_norm": {"map": "row_norm"},
    "row_norm_col_aware": {"map": "row_norm", "column_aware": True},
    "col_norm": {"map": "col_norm"},
    "centered_row_norm": {"map": "centered_row_norm"},
    "centered_row_norm_col_aware": {"map": "centered_row_norm", "column_aware": True, "scale": "muon"},
    "polar_ns_muon": {"map": "polar", "polar_method": "newton_schulz", "nesterov": True, "scale": "muon"},
    "polar_express": {"map": "polar", "polar_method": "polar_express"},
    "scaled_polar": {"map": "scaled_polar", "polar_method": "gram_eigh"},
    "right_spectral": {"map": "right_spectral"},
    "left_spectral": {"map": "left_spectral"},
    "hybrid": {"map": "hybrid"},
    "hybrid_col_aware": {"map": "hybrid", "column_aware": True},
    "hybrid_polar_then_row": {"map": "hybrid", "order": "polar_then_row"},
}
MAP_STEPS = 2


def case_tensors(seed: int, shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).float()


def map_group(spec_name: str, params: list) -> dict:
    return {**DEFAULTS, "lr": 0.02, "weight_decay": 0.01, "per_head": True, **MAP_SPECS[spec_name], "params": params}


def map_reference(spec_name: str) -> dict[str, torch.Tensor]:
    """Single process: every layout case in one param_group, MAP_STEPS steps."""
    params = {name: nn.Parameter(case_tensors(i, shape)) for i, (name, shape, _) in enumerate(LAYOUT_CASES)}
    layouts = {params[name]: lay for name, _, lay in LAYOUT_CASES}
    opt = EquiOptimizer([map_group(spec_name, list(params.values()))], layouts=layouts)
    for step in range(MAP_STEPS):
        for i, (name, shape, _) in enumerate(LAYOUT_CASES):
            params[name].grad = case_tensors(1000 * (step + 1) + i, shape)
        opt.step()
    return {k: v.detach().clone() for k, v in params.items()}


def run_maps(out: Path, mesh) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)

    results, paths, comm = {}, {}, {}
    for spec_name in MAP_SPECS:
        params = {name: nn.Parameter(shard(case_tensors(i, shape))) for i, (name, shape, _) in enumerate(LAYOUT_CASES)}
        layouts = {params[name]: lay for name, _, lay in LAYOUT_CASES}
        names = {p: n for n, p in params.items()}
        opt = EquiOptimizer([map_group(spec_name, list(params.values()))], layouts=layouts, names=names)
        paths[spec_name] = D.param_paths(opt, opt.param_groups[0])
        with D.count_comm() as stats:
            for step in range(MAP_STEPS):
                for i, (name, shape, _) in enumerate(LAYOUT_CASES):
                    params[name].grad = shard(case_tensors(1000 * (step + 1) + i, shape))
                opt.step()
        comm[spec_name] = dict(stats.bytes)
        results[spec_name] = {k: v.full_tensor().detach().clone() for k, v in params.items()}
    if D.is_rank0():
        torch.save({"params": results, "paths": paths, "comm": comm}, out / "maps.pt")


# (name, shape, layout, group spec, expected bytes sent per rank in one step, by kind)
# all_reduce of N bytes counts 2 (W-1)/W N = N on 2 ranks; all_to_all counts what leaves
COMM_CASES = [
    ("embedding_row_norm", (33, 16), Layout(), {"map": "row_norm"}, {}),
    ("head_centered_row_norm", (33, 16), Layout(), {"map": "centered_row_norm"}, {"all_reduce": 2 * 16 * 4}),
    ("down_col_aware_row_norm", (16, 25), Layout(), {"map": "row_norm", "column_aware": True}, {"all_reduce": 25 * 4}),
    ("embedding_right_spectral", (33, 16), Layout(), {"map": "right_spectral"}, {"all_reduce": 17 * 16 * 4}),
    # 5 rows: 3 on rank 0 (the owner), 2 on rank 1: rank 1 sends 2 rows, rank 0 returns 2 rows
    ("router_left_spectral", (5, 16), Layout(), {"map": "left_spectral"}, {"all_to_all": 2 * 16 * 4}),
    ("experts_hybrid", (3, 10, 7), Layout(stacked=True), {"map": "hybrid"}, {}),
    ("q_aligned_polar", (32, 16), Layout(heads=4), {"map": "polar", "per_head": True}, {}),
]


def run_comm(out: Path, mesh) -> None:
    from torch.distributed.tensor import Shard, distribute_tensor

    res = {}
    for i, (name, shape, layout, spec, _) in enumerate(COMM_CASES):
        p = nn.Parameter(distribute_tensor(case_tensors(i, shape), mesh, [Shard(0)], src_data_rank=None))
        opt = EquiOptimizer([{**DEFAULTS, **spec, "params": [p]}], layouts={p: layout})
        p.grad = distribute_tensor(case_tensors(50 + i, shape), mesh, [Shard(0)], src_data_rank=None)
        with D.count_comm() as stats:
            opt.step()
        mine = {k: v for k, v in stats.bytes.items() if k != "finite_check"}
        both = [None, None]
        torch.distributed.all_gather_object(both, mine)
        res[name] = both
    if D.is_rank0():
        torch.save(res, out / "comm.pt")


def run_none_and_skip(out: Path, mesh) -> None:
    """A group whose only parameter never gets a gradient, a group with one gradless and one
    gathered parameter, and a NaN gradient on rank 1's shard only (on_nonfinite='skip')."""
    from torch.distributed.tensor import Shard, distribute_tensor

    def shard(t):
        return distribute_tensor(t, mesh, [Shard(0)], src_data_rank=None)

    a = nn.Parameter(shard(case_tensors(1, (9, 6))))  # alone in its group, grad always None
    b = nn.Parameter(shard(case_tensors(2, (9, 6))))  # grad always None, group with c
    c = nn.Parameter(shard(case_tensors(3, (11, 6))))  # polar: gathered
    d = nn.Parameter(shard(case_tensors(4, (7, 6))))  # NaN on rank 1 at step 1
    groups = [
        {**DEFAULTS, "map": "polar", "params": [a]},
        {**DEFAULTS, "map": "polar", "lr": 0.1, "params": [b, c]},
        {**DEFAULTS, "map": "centered_row_norm", "lr": 0.1, "on_nonfinite": "skip", "params": [d]},
    ]
    opt = EquiOptimizer(groups)
    ref_c = nn.Parameter(case_tensors(3, (11, 6)))
    ref_d = nn.Parameter(case_tensors(4, (7, 6)))
    ref = EquiOptimizer(
        [
            {**DEFAULTS, "map": "polar", "lr": 0.1, "params": [ref_c]},
            {**DEFAULTS, "map": "centered_row_norm", "lr": 0.1, "params": [ref_d]},
        ]
    )
    rank = torch.distributed.get_rank()
    for step in range(3):
        gc, gd = case_tensors(10 + step, (11, 6)), case_tensors(20 + step, (7, 6))
        c.grad = shard(gc)
        bad = gd.clone()
        if step == 1:
            bad[-1, 0] = float("nan")  # last row: on rank 1's shard only
        d.grad = shard(bad)
        if rank == 0:
            assert torch.isfinite(d.grad.to_local()).all()
        opt.step()
        ref_c.grad = gc
        if step != 1:
            ref_d.grad = gd
        else:
            ref_d.grad = None
        ref.step()
    res = {
        "a_unchanged": torch.equal(a.full_tensor(), case_tensors(1, (9, 6))),
        "b_unchanged": torch.equal(b.full_tensor(), case_tensors(2, (9, 6))),
        "c_diff": (c.full_tensor() - ref_c).abs().max().item(),
        "d_diff": (d.full_tensor() - ref_d).abs().max().item(),
        "skips": opt.nonfinite_skips,
        "skips_all": [None, None],
    }
    skips = [None, None]
    torch.distributed.all_gather_object(skips, opt.nonfinite_skips)
    res["skips_all"] = skips
    # global gradient norm and clipping over shards (FSDP2) = the full tensors' norm
    full = {n: case_tensors(60 + i, s) for i, (n, s) in enumerate([("x", (9, 6)), ("y", (1, 4)), ("z", (5,))])}
    xs = {n: nn.Parameter(shard(torch.zeros_like(t))) for n, t in full.items()}
    for n, t in full.items():
        xs[n].grad = shard(t.clone())
    want = torch.sqrt(sum(t.double().square().sum() for t in full.values())).item()
    res["grad_norm"] = (D.grad_norm(xs.values()), want)
    before = D.clip_grad_norm_(xs.values(), want / 2)
    res["clipped_norm"] = (before, D.grad_norm(xs.values()), want / 2)
    # AdamW on DTensor shards, foreach on and off, vs plain tensors
    for foreach in (False, True):
        shapes = [(9, 6), (7,), (1, 5)]
        ps = [nn.Parameter(shard(case_tensors(30 + i, s))) for i, s in enumerate(shapes)]
        qs = [nn.Parameter(case_tensors(30 + i, s)) for i, s in enumerate(shapes)]
        spec = {**DEFAULTS, "map": "adamw", "lr": 0.01, "weight_decay": 0.1, "foreach": foreach}
        o1, o2 = EquiOptimizer([{**spec, "params": ps}]), EquiOptimizer([{**spec, "params": qs}])
        for step in range(3):
            for i, s in enumerate(shapes):
                g = case_tensors(40 + 10 * step + i, s)
                ps[i].grad, qs[i].grad = shard(g), g
            o1.step()
            o2.step()
        res[f"adamw_foreach_{foreach}_diff"] = max((p.full_tensor() - q).abs().max().item() for p, q in zip(ps, qs))
    if D.is_rank0():
        torch.save(res, out / "none_skip.pt")


# =========================================================================================
# model-level: DDP and FSDP2 training vs one process
# =========================================================================================
class ExtraGPT(PlainGPT):
    """PlainGPT (d=18, 3 heads: fused qkv heads straddle the 2-rank split; odd vocab; MoE
    router [4, d]; stacked experts) plus a [1, d] matrix (rank 1 holds an empty shard) and
    a Linear that the forward never uses (gradient None on every rank)."""

    def __init__(self):
        super().__init__(vocab=VOCAB, d=18, n_head=3, h=25, layers=2, moe_every=2, block_size=16)
        self.gain = nn.Parameter(torch.ones(1, 18) + 0.1 * torch.randn(1, 18))
        self.unused = nn.Linear(18, 7, bias=False)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x) * self.gain)


def make_model(arch: str = "plain") -> nn.Module:
    """``plain``: :class:`ExtraGPT`; ``qwen3`` / ``olmoe``: tiny Hugging Face models built
    from a config (float32, no download) with uneven shards: vocab 37, 3 query heads of 8
    (q rows 24 = 12 + 12 cut head 1), Qwen3 k/v with one KV head [8, 24], OLMoE 3 experts
    (2 + 1) of width 8 (CPU grouped_mm wants 16-byte strides) and router [3, 24]."""
    torch.manual_seed(0)
    if arch == "plain":
        return ExtraGPT()
    common = dict(
        vocab_size=HF_VOCAB,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=3,
        head_dim=8,
        max_position_embeddings=32,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    if arch == "qwen3":
        from transformers import Qwen3Config, Qwen3ForCausalLM

        return Qwen3ForCausalLM(Qwen3Config(intermediate_size=26, num_key_value_heads=1, **common)).float()
    if arch == "olmoe":
        from transformers import OlmoeConfig, OlmoeForCausalLM

        cfg = OlmoeConfig(
            intermediate_size=8,
            num_key_value_heads=3,
            num_experts=3,
            num_experts_per_tok=2,
            eos_token_id=None,
            pad_token_id=None,
            bos_token_id=None,
            **common,
        )
        return OlmoeForCausalLM(cfg).float()
    raise ValueError(arch)


HF_VOCAB = 37
HF_ARCHS = ("qwen3", "olmoe")


def batch(step: int, vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randint(0, vocab, (4, 13), generator=g)


def loss_fn(model, idx) -> torch.Tensor:
    out = model(idx[:, :-1])
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))


def build_opt(model, preset):
    layouts = FUSED_LAYOUTS if isinstance(D.unwrap(model), ExtraGPT) else None
    return D.build(model, preset, layouts=layouts)


def reference_run(preset: str, steps: int = STEPS, halves: bool = True, arch: str = "plain") -> dict[str, torch.Tensor]:
    """One process, ``steps`` steps on the global batch.

    ``halves=True``: the gradient is the mean of the gradients of the two half batches (what
    DDP and FSDP2 average, bitwise: dividing by 2 is exact), so that the comparison isolates
    the optimizer. ``halves=False``: one backward of the whole batch; equal mathematically,
    but its summation order differs, and AdamW's g / (|g| + eps) turns the rounding of
    gradient entries near 1e-8 (cancellations) into update differences of ~1e-3 lr.
    """
    model = make_model(arch)
    opt = build_opt(model, preset)
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        idx = batch(step, vocab(arch))
        if not halves:
            loss_fn(model, idx).backward()
        else:
            per = idx.shape[0] // 2
            grads = []
            for r in range(2):
                model.zero_grad(set_to_none=True)
                loss_fn(model, idx[r * per : (r + 1) * per]).backward()
                grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
            for n, p in model.named_parameters():
                if n in grads[0]:
                    p.grad = (grads[0][n] + grads[1][n]) / 2
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def full_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    inner = D.unwrap(model)
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in inner.named_parameters()}


def vocab(arch: str) -> int:
    return VOCAB if arch == "plain" else HF_VOCAB


def dist_setup(mode: str, preset: str, arch: str = "plain"):
    model = D.wrap_model(make_model(arch), mode, find_unused_parameters=arch == "plain")
    return model, build_opt(model, preset)


def dist_step(model, opt, step: int, arch: str = "plain") -> None:
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    idx = batch(step, vocab(arch))
    per = idx.shape[0] // world
    opt.zero_grad(set_to_none=True)
    loss_fn(model, idx[rank * per : (rank + 1) * per]).backward()
    opt.step()


def run_train(out: Path) -> None:
    timings = {}
    for mode in MODES:
        for preset in PRESETS:
            t0 = time.perf_counter()
            model, opt = dist_setup(mode, preset)
            with D.count_comm() as stats:
                for step in range(STEPS):
                    dist_step(model, opt, step)
            params = full_params(model)
            if D.is_rank0():
                torch.save({"params": params, "comm": dict(stats.bytes)}, out / f"train_{mode}_{preset}.pt")
            timings[f"{mode}_{preset}"] = time.perf_counter() - t0
    for preset in ("muon", "paper"):  # DDP with the spectral maps spread over the ranks
        model = D.wrap_model(make_model(), "ddp", find_unused_parameters=True)
        opt = D.build(model, preset, layouts=FUSED_LAYOUTS, spread=True)
        with D.count_comm() as stats:
            for step in range(STEPS):
                dist_step(model, opt, step)
        params = full_params(model)
        if D.is_rank0():
            torch.save({"params": params, "comm": dict(stats.bytes)}, out / f"train_ddp-spread_{preset}.pt")
    for arch in HF_ARCHS:
        for mode in MODES:
            t0 = time.perf_counter()
            model, opt = dist_setup(mode, "paper", arch)
            paths = {}
            if mode == "fsdp2":
                for g in opt.param_groups:
                    if g["map"] != "adamw":
                        paths.update(D.param_paths(opt, g))
            with D.count_comm() as stats:
                for step in range(STEPS):
                    dist_step(model, opt, step, arch)
            params = full_params(model)
            if D.is_rank0():
                torch.save(
                    {"params": params, "comm": dict(stats.bytes), "paths": paths}, out / f"train_{mode}_paper_{arch}.pt"
                )
            timings[f"{mode}_paper_{arch}"] = time.perf_counter() - t0
    # checkpoint: train CKPT_STEP steps, save, continue RESUME_STEPS steps
    for mode in MODES:
        model, opt = dist_setup(mode, "paper")
        for step in range(CKPT_STEP):
            dist_step(model, opt, step)
        D.save_checkpoint(
            out / f"ckpt_{mode}",
            model,
            opt,
            extra={"step": CKPT_STEP},
            rank_extra={"rank": torch.distributed.get_rank()},
        )
        for step in range(CKPT_STEP, CKPT_STEP + RESUME_STEPS):
            dist_step(model, opt, step)
        params = full_params(model)
        if D.is_rank0():
            torch.save(params, out / f"continued_{mode}.pt")
    if D.is_rank0():
        torch.save(timings, out / "train_timings.pt")


def run_resume(out: Path) -> None:
    for mode in MODES:
        model, opt = dist_setup(mode, "paper")  # fresh process, fresh model and optimizer
        extra, rank_extra = D.load_checkpoint(out / f"ckpt_{mode}", model, opt)
        assert extra["step"] == CKPT_STEP, extra
        assert rank_extra["rank"] == torch.distributed.get_rank(), rank_extra
        for step in range(extra["step"], CKPT_STEP + RESUME_STEPS):
            dist_step(model, opt, step)
        params = full_params(model)
        if D.is_rank0():
            torch.save(params, out / f"resumed_{mode}.pt")


def run_wide(out: Path, info) -> None:
    """Any world size: every layout x every map on a 1-D mesh of all ranks and, with 4 ranks,
    on an HSDP mesh (2 replicas x 2 shards); compared here with the single-process run."""
    from torch.distributed.device_mesh import init_device_mesh

    meshes = {f"1d-{info.world_size}": init_device_mesh("cpu", (info.world_size,))}
    if info.world_size == 4:
        meshes["hsdp-2x2"] = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    res = {}
    for mname, mesh in meshes.items():
        placements = [Shard(0)] if mesh.ndim == 1 else [Replicate(), Shard(0)]

        def shard(t, mesh=mesh, placements=placements):  # bound now (B023); used in this iteration only
            return distribute_tensor(t, mesh, placements, src_data_rank=None)

        for spec_name in MAP_SPECS:
            params = {n: nn.Parameter(shard(case_tensors(i, s))) for i, (n, s, _) in enumerate(LAYOUT_CASES)}
            layouts = {params[n]: lay for n, _, lay in LAYOUT_CASES}
            opt = EquiOptimizer(
                [map_group(spec_name, list(params.values()))], layouts=layouts, names={p: n for n, p in params.items()}
            )
            for step in range(MAP_STEPS):
                for i, (n, s, _) in enumerate(LAYOUT_CASES):
                    params[n].grad = shard(case_tensors(1000 * (step + 1) + i, s))
                opt.step()
            got = {k: v.full_tensor() for k, v in params.items()}
            ref = map_reference(spec_name)
            res[(mname, spec_name)] = max((got[k] - ref[k]).abs().max().item() for k in ref)
    if D.is_rank0():
        torch.save(res, out / f"wide-{info.world_size}.pt")


def main(argv) -> None:
    cmd, out = argv[0], Path(argv[1])
    torch.set_num_threads(1)
    info = D.init_from_env(timeout_s=float(os.environ.get("EQUIOPT_DIST_TIMEOUT", 90)), device="cpu")  # gloo
    if cmd == "wide":
        run_wide(out, info)
        D.barrier()
        if D.is_rank0():
            (out / f"done-{cmd}").write_text("ok")
        D.cleanup()
        return
    assert info.initialized and info.world_size == 2, info
    if cmd == "maps":
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (info.world_size,))
        run_maps(out, mesh)
        run_comm(out, mesh)
        run_none_and_skip(out, mesh)
    elif cmd == "train":
        run_train(out)
    elif cmd == "resume":
        run_resume(out)
    else:
        raise SystemExit(f"unknown command {cmd!r}")
    D.barrier()
    if D.is_rank0():
        (out / f"done-{cmd}").write_text("ok")
    D.cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
    # leave without the interpreter's teardown: after destroy_process_group a gloo worker
    # thread can still be joinable when C++ statics are destroyed, and std::terminate aborts
    # a run that has finished and written its results (about 1 run in 6 on 2 CPU cores)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
