# The step check of results/eigvalsh_pool/README.md; it needs the pool, so run it at commit 12fea85 (the last with it):
#   PYTHONPATH=src python results/eigvalsh_pool/step_check.py qwen3/tiny split 2   (modes: split, one)
import sys, time, statistics, dataclasses, torch
sys.path.insert(0, "/work/main/src"); sys.path.insert(0, "/work/main/benchmarks")
from route_check import model_of
import equiopt
from equiopt import fastpath
name, mode, th = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.set_num_threads(th)
fastpath.EIGVALSH_SPLIT_MAX_M = 127 if mode == "split" else 0
model = model_of(name)
gen = torch.Generator().manual_seed(0)
for p in model.parameters(): p.grad = torch.randn(p.shape, generator=gen) * 1e-3
res = []
for preset in ("paper", "muon"):
    opt = equiopt.build(model, preset=preset)
    opt.step()
    reps = 3 if "medium" in name else 9
    ts = []
    for _ in range(reps):
        t = time.perf_counter(); opt.step(); ts.append(time.perf_counter() - t)
    res.append(f"{preset} {1e3*statistics.median(ts):.1f} ms")
print(name, mode, th, " | ".join(res), flush=True)
