"""The `train` subcommand: its options and its run, kept here so `cli.py` only registers it.

Importing this module does not import torch: settings are checked first (bad input exits 2 in a
fraction of a second), the training code is imported only once they pass. Option names are
stable: scripts (scripts/train_default.sh) depend on them.
"""

from __future__ import annotations

import argparse
import json
import sys

from model_backend.learn.training.config import LAYOUTS, MODES, TrainConfig


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="train a CDIKTNet (CDIS on pairs, CDTS on unpaired images)",
                       description="Train CDIKTNet; writes --out (inference .safetensors) and OUT.ckpt.pt beside it.")
    p.add_argument("--layout", required=True, help=" | ".join(LAYOUTS))
    p.add_argument("--data", required=True, help="dataset folder; for raster: a raster, a folder of rasters, "
                                                 "or a text file with one raster [footprint_m] per line")
    p.add_argument("--mode", required=True, help=" | ".join(MODES))
    p.add_argument("--out", required=True, help="output weights FILE (.safetensors); the checkpoint is FILE.ckpt.pt")
    p.add_argument("--paired-fraction", type=float, help="fewshot: share of locations kept paired (default 0.02)")
    p.add_argument("--paired-unit", default="location", help="fewshot: split by 'location' or by 'pair'")
    p.add_argument("--backbone", help="timm name or mobilenet_v2 (default: --init's, else mobilenet_v2)")
    p.add_argument("--init", help="starting weights: CDIKTNet .safetensors, OUT.ckpt.pt, or backbone state dict")
    p.add_argument("--epochs", type=float, default=2.0, help="CDIS epochs (default %(default)s)")
    p.add_argument("--steps", type=int, help="CDIS steps (overrides --epochs)")
    p.add_argument("--batch-size", type=int, default=16, help="pairs per batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--backbone-lr-scale", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", help="continue from a checkpoint (OUT.ckpt.pt) with the same settings")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda[:N]")
    p.add_argument("--amp", default="auto",
                   help="mixed precision: auto (GPU: bf16 where supported, else fp16 with loss scaling) | off | "
                        "bf16 | fp16; on CPU only an explicit bf16 applies")
    p.add_argument("--input-size", type=int, help="model input size in pixels (default: the backbone's)")
    p.add_argument("--footprint-m", type=float, help="raster: ground size of a location (default: per raster)")
    p.add_argument("--locations", type=int, help="raster: number of locations (default: a grid over each raster)")
    p.add_argument("--views-per-location", type=int, default=8, help="raster: drone views per location and epoch")
    p.add_argument("--grey", type=float, default=0.0,
                   help="chance (0-1) that a training image is shown in grey: shape over colour, for other seasons")
    p.add_argument("--height", type=int, help="sues200: flight height 150 | 200 | 250 | 300")
    p.add_argument("--freeze-blocks", type=int, default=0, help="leading backbone blocks kept frozen")
    p.add_argument("--cdts-epochs", type=int, default=4)
    p.add_argument("--cdts-iters", type=int, help="CDTS steps per epoch (default: one pass over the drone images)")
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints")
    p.add_argument("--workers", type=int, help="data loader processes (default: by CPU count)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--log-every", type=int, default=10, help="steps between progress lines (when not a terminal)")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(weights=None, runtime="auto")
    return p


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        layout=args.layout, data=args.data, mode=args.mode, out=args.out, paired_fraction=args.paired_fraction,
        paired_unit=args.paired_unit, backbone=args.backbone, init=args.init, epochs=args.epochs, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, backbone_lr_scale=args.backbone_lr_scale, seed=args.seed,
        device=args.device, amp=args.amp, input_size=args.input_size, footprint_m=args.footprint_m,
        height=args.height, freeze_blocks=args.freeze_blocks, locations=args.locations,
        views_per_location=args.views_per_location, grey=args.grey, cdts_epochs=args.cdts_epochs,
        cdts_iters=args.cdts_iters,
        checkpoint_every=args.checkpoint_every, resume=args.resume, workers=args.workers, log_every=args.log_every)


def run(args: argparse.Namespace) -> int:
    """Validate (exit 2 on bad input, via InputError), train, print one JSON summary line on stdout."""
    cfg = config_from_args(args).validate()
    if args.threads is not None and args.threads < 1:
        from model_backend.core.errors import InputError

        raise InputError(f"--threads must be at least 1, got {args.threads}.")
    import torch

    from model_backend.learn.training.modes import train

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        result = train(cfg)
    finally:
        from model_backend.core.dist import is_main, shutdown

        main = is_main()
        shutdown()
    if main:
        print(json.dumps(result.summary()), flush=True)
        if result.stopped:
            print(f"stopped early; resume with --resume {result.checkpoint}", file=sys.stderr)
    return 0
