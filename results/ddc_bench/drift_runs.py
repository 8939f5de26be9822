import json, dataclasses
from equiopt.train import loop as L, data as D
data = D.DataConfig(cache="/tmp/ddc_cache")
prep = D.prepare(data, log=lambda m: None)
out = {}
for arch in ("qwen3", "olmoe"):
    for opt in ("adamw", "muon", "paper", "ddc_adam", "ddc_muon"):
        cfg = L.TrainConfig(arch=arch, optimizer=opt, steps=60, batch_size=8, eval_every=60, eval_tokens=4096,
                            ckpt_every=0, keep_checkpoint=False, data=data, out=f"/tmp/ddc_drift/{arch}_{opt}", threads=1)
        L.train(cfg, prepared=prep, progress=False, log=lambda m: None, overwrite=True)
        r = L.read_metrics(cfg.out)[-1]
        g = {k: v for k, v in r["gauge"].items() if "/" not in k}
        out[f"{arch}/{opt}"] = {"val_loss": r["val_loss"], **g}
        print(arch, opt, json.dumps({k: round(v, 4) for k, v in out[f"{arch}/{opt}"].items()}), flush=True)
json.dump(out, open("/tmp/ddc_drift/summary.json", "w"), indent=1)
