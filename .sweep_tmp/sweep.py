import json, sys, time, torch, os
sys.path.insert(0, os.getcwd())
from torch import nn
from probflow import digits
from probflow.adapters import DiscreteTimeModel
class W(nn.Module):
    def __init__(s, net): super().__init__(); s.net = net.cuda()
    def forward(s, x, t): return s.net(x.cuda(), t.cuda()).cpu()
out = os.environ.get("OUT", "/tmp")
configs = json.loads(sys.argv[1])
for cfg in configs:
    steps = cfg.pop("steps"); dop = cfg.pop("dopri", 0)
    t0 = time.time()
    net, rec = digits.train(0, steps, device="cuda", **cfg)
    tt = time.time() - t0
    m = DiscreteTimeModel(W(net.cuda().eval()), digits.schedule(), sample_shape=(1,8,8), model_dtype=torch.float32)
    r = digits.evaluate(m, ddim_steps=(10, 20, 100), adaptive=(("dopri5", 1e-5),) if dop else (), n=2000)
    line = {"cfg": cfg, "steps": steps, "train_s": round(tt,1), "final_loss": rec["final_loss"], "floor": r["frechet_floor_train_vs_test"],
            "runs": [(x["method"], x["steps"], x["nfe"], round(x["frechet"],3), round(x["min_class_fraction"],3), round(x["mean_confidence"],3)) for x in r["runs"]]}
    print(json.dumps(line), flush=True)
    with open(f"{out}/sweep.jsonl", "a") as f: f.write(json.dumps(line)+"\n")
