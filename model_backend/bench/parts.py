"""The parts of `make bench` beyond speed/query/photo/accuracy, and the `floors` summary of the final JSON line.

Kept apart from bench.py to keep both short. Each part is a function returning a dict of
figures; `run_part` runs one so that its failure (an import error in code being changed, a
child process that dies, a missing data file) is recorded as `<part>_error` and the others still
run: one broken figure must not cost the whole history line.

- scale (issue #7): `runtimes`, `query_with_embed`, `ann`, `rss40k`, `sharding` (bench_scale.py, bench_ann.py);
- `training` (issue #3): CDIS training images/s on CPU, and on CUDA (AMP bf16) when present;
- `gpu`: model-only ConvNeXt-Tiny at 384 px, bf16, channels_last, and its fraction of the card's peak;
- `adapt` (issue #4): the few-shot adaptation benchmark, fixed seed.
"""

from __future__ import annotations

import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

Say = Callable[[str], None]
Figures = dict[str, Any]

SCALE_PARTS = ("runtimes", "query_with_embed", "ann", "rss40k", "sharding")
QUICK_SKIPS = ("rss40k", "sharding", "adapt", "adapt_matrix")
"""Parts a `--quick` run leaves out: each takes minutes (or a child process) and none is a smoke test."""

CONVNEXT_TINY_GFLOP_384 = 26.3
"""Forward FLOPs of ConvNeXt-Tiny at 384 x 384 (2 x 13.1 GMAC), per tile."""
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("GH200", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10G", 70.0), ("A10", 125.0),
)
"""Dense (no sparsity) bf16 tensor-core peak by device-name substring, first match wins (so 'H100 PCIe'
comes before 'H100', whose bare name is the SXM card: 'NVIDIA H100 80GB HBM3')."""


def run_part(name: str, fn: Callable[[], Figures], out: Figures, say: Say) -> None:
    """Run one part into `out`; on failure record `<name>_error` (message) and carry on. Times it in `part_seconds`."""
    t0 = time.perf_counter()
    try:
        out.update(fn())
    except Exception as exc:  # any failure of one part: recorded, never fatal to the others
        out[f"{name}_error"] = f"{type(exc).__name__}: {exc}"[:500]
        say(f"{name:8s} FAILED: {out[f'{name}_error']}")
        say("".join(traceback.format_exception(exc)[-3:]).rstrip())
    out.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t0, 1)


def device_name(dev: torch.device) -> str:
    """The GPU's name, else the CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_rss_mb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1 << 20) if sys.platform == "darwin" else rss / 1024



# --------------------------------------------------------------------------------------------- scale (issue #7)

def part_runtimes(threads: int | None, quick: bool, say: Say) -> Figures:
    from model_backend.bench.scale import bench_runtimes

    r = bench_runtimes(rounds=4 if quick else 12, threads=threads)
    say(f"runtimes {r['runtime_model_tiles_per_s']:8.1f} tiles/s  {r['runtimes_selected']} model alone vs ONNX "
        f"Runtime defaults {r['onnxruntime_tiles_per_s']:.1f}: x{r['model_vs_onnxruntime']:.3f} (floor >= 1.0; "
        f"per round p10/median/p90 {r['model_vs_onnxruntime_rounds']}); all {r['runtime_tiles_per_s']}; "
        f"agreement {r['runtime_min_cosine_vs_torch']}")
    return r


def part_query_with_embed(quick: bool, say: Say) -> Figures:
    from model_backend.bench.scale import bench_query_with_embed

    r = bench_query_with_embed(reps=3 if quick else 5)
    say(f"query+   {r['query_s_1e5_with_embed']:8.3f} s        photo at 8 rotations {r['query_embed_s']:.3f} s + "
        f"scoring {r['query_with_embed_tiles']:,} tiles {r['query_score_s']:.3f} s (median; floor <= 0.15 s)")
    say(f"scoring  {r['query_score_vs_read']:8.2f} x      kernel {r['query_kernel']}: scoring alone "
        f"{r['query_score_alone_s']:.4f} s vs reading the fp16 matrix once {r['query_read_matrix_s']:.4f} s "
        f"(floor <= 3x); each kernel {r['query_kernel_s']}; recall@10 vs exact {r['query_recall_at_10']:.2f}")
    return r


def part_ann(quick: bool, say: Say) -> Figures:
    from model_backend.bench.ann import bench_ann

    r = bench_ann(n_vectors=50_000 if quick else 200_000, n_queries=200 if quick else 500)
    say(f"ann      {r['ann_recall_at_10']:8.4f}        recall@10 of {r['ann_kind']} on {r['ann_vectors']:,} vectors "
        f"(floor >= 0.99); {r['ann_bytes_per_1e6_tiles'] / 1e6:.0f} MB per 10^6 tiles vs "
        f"{r['exact_fp16_bytes_per_1e6_tiles'] / 1e6:.0f} MB exact fp16")
    return r


def part_rss40k(say: Say) -> Figures:
    from model_backend.bench.scale import bench_peak_rss_40k

    r = bench_peak_rss_40k()
    say(f"rss40k   {r['peak_rss_bytes_40k'] / 1e9:8.3f} GB     peak RSS indexing {r['peak_rss_40k_raster']} "
        f"({r['peak_rss_40k_tiles']} tiles, {r['peak_rss_40k_index_s']:.0f} s); limit "
        f"{r['peak_rss_40k_limit_bytes'] / 1e9:.3f} GB = 2 GB + model")
    return r


def part_sharding(say: Say) -> Figures:
    from model_backend.bench.scale import bench_sharding

    r = bench_sharding()
    say(f"sharding {r['sharding_sharded_s']:8.1f} s        torchrun 2 x gloo vs one process "
        f"{r['sharding_single_s']:.1f} s; same tiles {r.get('sharding_same_tiles')}, "
        f"equal within fp16 {r.get('sharding_equal_within_fp16')}")
    return r


# -------------------------------------------------------------------------------------------- training (issue #3)

def part_training(threads: int, quick: bool, say: Say) -> Figures:
    """CDIS training images/s: CPU always (with `threads`), CUDA (AMP bf16) when a device is present.

    `training_throughput` sets torch's thread count; it is put back after, so later parts run
    as they would have.
    """
    from model_backend.bench.training import training_throughput

    before = torch.get_num_threads()
    try:
        cpu = training_throughput(steps=2 if quick else 3, device="cpu", threads=threads)
    finally:
        torch.set_num_threads(before)
    out: Figures = {"training_images_per_s_cpu": cpu["images_per_s"], "training_step_s_cpu": cpu["step_s"],
                    "training_threads_cpu": cpu["threads"], "training_backbone": cpu["backbone"],
                    "training_batch_pairs_cpu": cpu["batch_pairs"], "training_input_size": cpu["input_size"]}
    say(f"training {cpu['images_per_s']:8.2f} images/s CPU, {cpu['threads']} threads ({cpu['backbone']} "
        f"{cpu['input_size']} px, {cpu['batch_pairs']} pairs a step, {cpu['step_s']:.2f} s a step)")
    if not torch.cuda.is_available():
        out["training_cuda_skipped"] = "no CUDA device"
        return out
    gpu = training_throughput(steps=5 if quick else 20, batch_size=32, device="cuda")
    out.update({"training_images_per_s_cuda": gpu["images_per_s"], "training_step_s_cuda": gpu["step_s"],
                "training_amp_cuda": gpu["amp"], "training_batch_pairs_cuda": gpu["batch_pairs"]})
    say(f"training {gpu['images_per_s']:8.1f} images/s CUDA ({gpu['amp']} autocast, {gpu['batch_pairs']} pairs a step)")
    return out


# ------------------------------------------------------------------------------------------------- GPU embedding

def peak_bf16_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of a card by its name (`PEAK_BF16_TFLOPS`), None when not in the table."""
    for key, tflops in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops * 1e12
    return None


def part_gpu(quick: bool, say: Say) -> Figures:
    """Model-only tiles/s of ConvNeXt-Tiny (random weights) at 384 px, bf16 autocast, channels_last, on CUDA.

    The GPU embedding floor is about the model's use of the card, so it is timed alone (CUDA
    events around a run of batches, after warm-up) and set against the card's bf16 peak:
    26.3 GFLOP per tile x tiles/s / peak FLOP/s.
    """
    if not torch.cuda.is_available():
        return {"gpu_skipped": "no CUDA device"}
    import timm

    dev = torch.device("cuda")
    name = torch.cuda.get_device_name(dev)
    batch, iters = (64, 10) if quick else (128, 30)
    torch.backends.cudnn.benchmark = True
    net = timm.create_model("convnext_tiny", pretrained=False, num_classes=0).to(dev).eval()
    net = net.to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 384, 384, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(5):
            net(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            net(x)
        end.record()
        torch.cuda.synchronize()
    rate = batch * iters / (start.elapsed_time(end) / 1000.0)
    peak = peak_bf16_flops(name)
    frac = CONVNEXT_TINY_GFLOP_384 * 1e9 * rate / peak if peak else None
    say(f"gpu      {rate:8.0f} tiles/s  ConvNeXt-Tiny 384 px bf16 channels_last, model alone, batch {batch} on {name}"
        + (f": {frac:.1%} of the {peak / 1e12:.0f} TFLOP/s bf16 peak" if frac is not None else " (peak unknown)"))
    return {"gpu_device_name": name, "gpu_model": "convnext_tiny (random weights)", "gpu_input_size": 384,
            "gpu_batch": batch, "gpu_tiles_per_s": round(rate, 1), "gpu_gflop_per_tile": CONVNEXT_TINY_GFLOP_384,
            "gpu_peak_bf16_tflops": peak / 1e12 if peak else None,
            "gpu_fraction_of_ceiling": round(frac, 4) if frac is not None else None}


# ------------------------------------------------------------------------------------------------ adapt (issue #4)

def part_adapt(say: Say, seed: int = 0) -> Figures:
    """Both cases of adapt_bench at one seed; the camera case's keys read `adapt_camera_*`."""
    from model_backend.bench.adapt import adapt_benchmark

    out: Figures = {}
    for case, prefix in (("cross-year", "adapt_"), ("camera", "adapt_camera_")):
        r = adapt_benchmark(case=case, seed=seed)
        if "adapt_gain_points" in r:
            say(f"adapt    {r['adapt_gain_points']:+8.1f} points top-1 ({r['adapt_top1_before']:.1%} -> "
                f"{r['adapt_top1_after']:.1%}, {case}, seed {seed}, {r['adapt_n_test']} held out, look "
                f"{r['adapt_look']}) in {r['adapt_wall_s']:.0f} s (floor >= 15 points, <= 300 s)")
        else:
            say(f"adapt    {case} skipped: {r.get('adapt_skipped', r)}")
        out.update({prefix + k.removeprefix("adapt_"): v for k, v in r.items()})
    return out


def part_cross_year(seeds: int, views: int, quick: bool, tmp: Path, say: Say) -> Figures:
    """bench.cross_year: six year pairs x `seeds` seeds x `views` views, footprint x1.0, x1.3 and x0.75
    (quick: x1.0)."""
    from model_backend.bench.cross_year import cross_year_benchmark

    return cross_year_benchmark(say, seeds=range(seeds), n_views=views,
                                factors=(1.0,) if quick else (1.0, 1.3, 0.75), tmp=tmp)


def part_adapt_matrix(seeds: int, log: Path | None, say: Say) -> Figures:
    """bench.adapt_matrix over `seeds` seeds (0..seeds-1), all six year pairs, footprint x1.0 and x1.3."""
    from model_backend.bench.adapt_matrix import run_matrix

    return run_matrix(seeds=range(seeds), log=log, say=say)


# ---------------------------------------------------------------------------------------------------------- floors

@dataclass(frozen=True)
class Floor:
    """One floor of the issues: the figure `key` must be `cmp` `floor` (a number, or the key of a measured limit)."""

    key: str
    cmp: str
    floor: float | str | None
    note: str = ""


FLOORS: dict[str, Floor] = {
    "model_vs_onnxruntime": Floor("model_vs_onnxruntime", ">=", 1.0, "CPU model alone vs ONNX Runtime defaults"),
    "e2e_vs_model": Floor("e2e_vs_model", ">=", 0.90, "CPU build_index end to end vs model alone, whole build"),
    "query_s_1e5_with_embed": Floor("query_s_1e5_with_embed", "<=", 0.15,
                                    "photo at 8 rotations + scoring 10^5 tiles, seconds"),
    "query_score_vs_read": Floor("query_score_vs_read", "<=", 3.0,
                                 "scoring 10^5 tiles vs reading their fp16 matrix once from memory"),
    "query_recall_at_10": Floor("query_recall_at_10", ">=", 0.99, "top-10 tiles of the chosen kernel vs exact fp32"),
    "peak_rss_bytes_40k": Floor("peak_rss_bytes_40k", "<=", "peak_rss_40k_limit_bytes",
                                "indexing a 40k x 40k VRT; limit 2 GB + the loaded model"),
    "synth_render_s": Floor("synth_render_s", "<=", 0.5, "one 640x480 semi-synthetic view, seconds (a whole-raster "
                            "read would show)"),
    "ann_recall_at_10": Floor("ann_recall_at_10", ">=", 0.99, "compressed index vs exact search"),
    "ann_bytes_per_1e6_tiles": Floor("ann_bytes_per_1e6_tiles", "<=", None,
                                     "compressed index memory per 10^6 tiles: reported, no number set"),
    "footprint_synth_ratio": Floor("footprint_synth_ratio", ">=", 0.9,
                                   "semi-synthetic top-1, footprint given x0.75 / x1.3 (worst) vs the true one"),
    "footprint_cross_year_ratio": Floor("footprint_cross_year_ratio", ">=", 0.9,
                                        "cross-year top-1 with the footprint given x0.75 / x1.3 (worst) vs the true "
                                        "one (low top-1: mostly noise, see footprint_cross_year's intervals)"),
    "flight_same_date_top1": Floor("flight_same_date_top1", ">=", 0.98,
                                   "simulated same-date flights: photos whose track place is within one footprint"),
    "flight_same_date_median_error_m": Floor("flight_same_date_median_error_m", "<=", 3.0,
                                             "same flights: median distance of the track place to the truth, m"),
    "flight_cross_year_gain_points": Floor("flight_cross_year_gain_points", ">=", 25.0,
                                           "cross-year flights: top-1 points of the track above each photo alone"),
    "flight_decode_ms_per_photo": Floor("flight_decode_ms_per_photo", "<=", 10.0,
                                        "decoding (states + Viterbi + forward-backward), ms per photo, median flight"),
    "flight_scale_s_per_photo": Floor("flight_scale_s_per_photo", "<=", 1.0,
                                      "500-photo flight on a 10^5-tile index, no verification, s per photo (2 cores)"),
    "flight_scale_decode_ms_per_photo": Floor("flight_scale_decode_ms_per_photo", "<=", 10.0,
                                              "decoding that flight (hub correction over 10^5 tiles), ms per photo"),
    "cross_year_top1_mean": Floor("cross_year_top1_mean", ">=", 0.45,
                                  "cross-year top-1 unadapted (ImageNet; embedding + structure re-rank), mean of "
                                  "6 year pairs x seeds, footprint x1"),
    "cross_year_x1.3_ratio": Floor("cross_year_x1.3_ratio", ">=", 0.9,
                                   "the same with the footprint given x1.3, vs x1"),
    "cross_year_x0.75_ratio": Floor("cross_year_x0.75_ratio", ">=", 0.9,
                                    "the same with the footprint given x0.75, vs x1"),
    "adapt_matrix_before_mean": Floor("adapt_matrix_before_mean", ">=", 0.45,
                                      "cross-year top-1 before adapting, mean of 6 year pairs x seeds (footprint x1)"),
    "adapt_matrix_in_use_mean": Floor("adapt_matrix_in_use_mean", ">=", 0.70,
                                      "cross-year top-1 of the model in use after 10 labels, same runs"),
    "adapt_matrix_activated_worse": Floor("adapt_matrix_activated_worse", "<=", 0,
                                          "runs (both footprints) whose recommended model was worse on 100 photos"),
    "adapt_matrix_wall_max_s": Floor("adapt_matrix_wall_max_s", "<=", 300.0,
                                     "slowest adaptation of the matrix (10 labels), seconds"),
    "adapt_gain_points": Floor("adapt_gain_points", ">=", 15.0,
                               "top-1 points gained by adaptation, cross-year photos, seed 0"),
    "adapt_wall_s": Floor("adapt_wall_s", "<=", 300.0, "adaptation wall time, cross-year photos, seconds"),
    "adapt_camera_gain_points": Floor("adapt_camera_gain_points", ">=", 15.0,
                                      "top-1 points gained by adaptation, heavy colour/blur camera shift, seed 0"),
    "adapt_camera_wall_s": Floor("adapt_camera_wall_s", "<=", 300.0,
                                 "adaptation wall time, colour/blur camera shift, seconds"),
}


def floors(out: Figures) -> tuple[dict[str, Figures], bool]:
    """{name: {value, floor, met, cmp, note}} for every floor, and whether all are measured and met.

    A figure that was not measured (part skipped or failed) has value and met null; a floor with
    no number (memory per 10^6) has met null and does not count against the total.
    """
    table: dict[str, Figures] = {}
    all_met = True
    for name, f in FLOORS.items():
        value = out.get(f.key)
        floor = out.get(f.floor) if isinstance(f.floor, str) else f.floor
        met: bool | None = None
        if value is not None and floor is not None:
            met = bool(value >= floor) if f.cmp == ">=" else bool(value <= floor)
        if floor is not None and not met:
            all_met = False
        table[name] = {"value": value, "floor": floor, "met": met, "cmp": f.cmp, "note": f.note}
    return table, all_met
