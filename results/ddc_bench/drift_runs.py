"""Orbit drift after 60 steps (results/ddc_bench/drift.md): the final record's gauge aggregates.

PYTHONPATH=src python results/ddc_bench/drift_runs.py [--archs qwen3,olmoe] [--optimizers ...] [--out DIR]
"""

import argparse
import json

from equiopt.train import data as D
from equiopt.train import loop as L

ap = argparse.ArgumentParser()
ap.add_argument("--archs", default="qwen3,olmoe")
ap.add_argument("--optimizers", default="adamw,muon,paper,ddc_adam,ddc_muon")
ap.add_argument("--out", default="/tmp/ddc_drift")
args = ap.parse_args()
data = D.DataConfig()
prep = D.prepare(data, log=lambda m: None)
out = {}
for arch in args.archs.split(","):
    for opt in args.optimizers.split(","):
        cfg = L.TrainConfig(
            arch=arch,
            optimizer=opt,
            steps=60,
            batch_size=8,
            eval_every=60,
            eval_tokens=4096,
            ckpt_every=0,
            keep_checkpoint=False,
            data=data,
            out=f"{args.out}/{arch}_{opt}",
            threads=1,
        )
        L.train(cfg, prepared=prep, progress=False, log=lambda m: None, overwrite=True)
        r = L.read_metrics(cfg.out)[-1]
        g = {k: v for k, v in r["gauge"].items() if "/" not in k}
        out[f"{arch}/{opt}"] = {"val_loss": r["val_loss"], **g}
        print(arch, opt, json.dumps({k: round(v, 4) for k, v in out[f"{arch}/{opt}"].items()}), flush=True)
with open(f"{args.out}/summary.json", "w") as f:
    json.dump(out, f, indent=1)
