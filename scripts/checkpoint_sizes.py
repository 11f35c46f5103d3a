"""Checkpoint sizes with the whole network (before) and adapter-sized (after), issue 10 row 5:
    python scripts/checkpoint_sizes.py vit_b 224 64     # model_size image_size lora_rank
"""
import os
import sys
import tempfile
import time

import torch  # noqa: E402

from bundle.checkpoints import BaseModel, TrainedWeights  # noqa: E402
from bundle.export import merge_lora  # noqa: E402
from bundle.networks import PromptableSAM  # noqa: E402

torch.set_num_threads(1)
size, image, rank = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
net = PromptableSAM(size, image, lora_rank=rank, seed=0)
params = [p for p in net.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.01)
for p in params:
    p.grad = torch.zeros_like(p)
opt.step()  # AdamW state (exp_avg, exp_avg_sq) exists as after one training step
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
trainer = {"epoch_length": 8, "iteration": 8, "max_epochs": 4}
rest = {"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(), "trainer": trainer}
t = time.time()
base = BaseModel(net, None, 0).state_dict()
t_base = time.time() - t
files = {
    "before: checkpoint_epoch=N.pt (whole network + optimiser ...)": {"network": net.state_dict(), **rest},
    "before: best_model.pt (whole network)": net.state_dict(),
    "after:  checkpoint_epoch=N.pt (trained tensors + base record + optimiser ...)": {"base": base, "network": TrainedWeights(net).state_dict(), **rest},
    "after:  best_model.pt (trained tensors + base record)": {"base": base, "network": TrainedWeights(net).state_dict()},
    "unchanged: model.pt (merged, lora_rank 0)": merge_lora(net).state_dict(),
}
with tempfile.TemporaryDirectory() as tmp:
    for name, obj in files.items():
        path = os.path.join(tmp, "f.pt")
        torch.save(obj, path)
        print(f"{size} image_size {image} lora_rank {rank}: {name}: {os.path.getsize(path) / 1e6:.1f} MB")
print(f"base fingerprint: {t_base:.2f} s")
