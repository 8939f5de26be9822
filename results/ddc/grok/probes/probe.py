import sys, json, time
from equiopt.train.ddc_experiments import grok_run
depth=int(sys.argv[1]); rate=float(sys.argv[2]); steps=int(sys.argv[3]); opts_=sys.argv[4].split(",")
for o in opts_:
    d=dict(modulus=97,train_fraction=float(sys.argv[5]) if len(sys.argv)>5 else 0.4,depth=depth,width=64,hidden=128,steps=steps,eval_every=50,lr_scale=1.0,decay_rate=rate,target_acc=0.99)
    r=grok_run(d,o,0)
    h=r["history"]
    print(o, depth, rate, "grok", r["grok_step"], "wall %.0f"%r["wall_s"], [(x["step"], round(x["train_acc"],2), round(x["val_acc"],3)) for x in h[::4]], flush=True)
