"""Training throughput for `make bench`: how many images a second one CDIS step digests here.

Random tensors stand in for images, so the figure is the model's (forward, the three CDIS losses,
backward, AdamW), not the JPEG decoding or view simulation that a real run also pays for; one
warm-up step is excluded. On CUDA the step runs as training does there (AMP, channels_last).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from model_backend.learn.training.engine import Runtime, WarmupCosine, optimizer_step, param_groups
from model_backend.nn.cdiktnet import CDIKTNet, CDISLoss


def training_throughput(steps: int = 3, batch_size: int = 8, size: int = 224, backbone: str = "mobilenet_v2",
                        device: str = "cpu", n_classes: int = 100, threads: int | None = None) -> dict[str, Any]:
    """{"images_per_s", "step_s", ...} of supervised CDIS steps with `batch_size` pairs (2 x images)."""
    from model_backend.core.dist import resolve_device

    if threads:
        torch.set_num_threads(threads)
    dev = resolve_device(device)
    dtype = None
    if dev.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    rt = Runtime(dev, amp_dtype=dtype, scaler=torch.amp.GradScaler("cuda") if dtype == torch.float16 else None)
    gen = torch.Generator().manual_seed(0)
    model = CDIKTNet(backbone, n_classes).to(dev)
    if rt.cuda:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 1e-3, 0.1, 0.01), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(steps + 1, 0))
    params = [p for g in opt.param_groups for p in g["params"]]
    loss_fn = CDISLoss()
    drone = rt.to_device(torch.randn(batch_size, 3, size, size, generator=gen))
    sat = rt.to_device(torch.randn(batch_size, 3, size, size, generator=gen))
    labels = torch.randint(0, n_classes, (batch_size,), generator=gen).to(dev)
    times = []
    for _ in range(steps + 1):
        if rt.cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        with rt.autocast():
            res = loss_fn(model(drone, sat), labels)
        optimizer_step(res.total, params, opt, sched, rt, 100.0)
        if rt.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    step_s = sorted(times[1:])[len(times[1:]) // 2]
    return {"backbone": backbone, "device": str(dev), "input_size": size, "batch_pairs": batch_size,
            "steps": steps, "step_s": round(step_s, 3), "images_per_s": round(2 * batch_size / step_s, 2),
            "amp": str(dtype).replace("torch.", "") if dtype else "off", "threads": torch.get_num_threads()}
