"""DDP worker for tests/test_lora_modules.py, kept apart so the spawned processes import only
torch and qlora_fast (not the test module's oracles), which keeps the spawn cheap."""
import os

import torch
from torch import nn

from qlora_fast.nn import LoRALinear, QLoRALinear


def ddp_model():
    """The same small LoRA + QLoRA model on every rank (fixed seed), with non-zero B."""
    torch.manual_seed(0)
    first = LoRALinear.from_linear(nn.Linear(12, 10), r=2, lora_alpha=4)
    second = QLoRALinear.from_linear(nn.Linear(10, 5), r=2, lora_alpha=4)
    with torch.no_grad():
        first.lora_B.normal_()
        second.lora_B.normal_()
    return nn.Sequential(first, nn.Tanh(), second)


def ddp_data(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(4, 12, generator=g), torch.randn(4, 5, generator=g)


def ddp_worker(rank, world_size, init_file, out_dir, steps):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(ddp_model())
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        x, target = ddp_data(rank)
        for _ in range(steps):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), target).backward()
            opt.step()
        torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
