"""Which engine runs the network on this CPU: the fastest one measured here, not one picked by rule.

A rule ("OpenVINO first") was right on the machine it was written on (1.25x ONNX Runtime) and
wrong on another 2-core machine (0.92x ONNX Runtime's defaults). So `auto` times every
candidate it can build - OpenVINO, ONNX Runtime with its defaults, ONNX Runtime tuned (one pool,
no spinning) and PyTorch eager - on the same exported graph, in alternating rounds so a noisy
neighbour hurts all alike, and keeps the fastest. The answer is remembered per machine
(`core.machine`, keyed by the processor) and per network shape (architecture, pooling, input
size, threads and runtime versions), not per weights file: speed depends on the graph, not on
the values in it, so an adapted model reuses its parent's measurement.

ONNX Runtime's defaults are the yardstick (the bench's `model_vs_onnxruntime` >= 1.0), so another
runner replaces them only when it is faster by MARGIN: within the noise the choice *is* the
yardstick, and never slower than it. (Its photo-sized calls run on a twin session that stops
spinning when a run returns: `nn.runtime.OnnxRuntimeRunner`.)
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from model_backend.core.dist import env_world_size
from model_backend.core.machine import profile_path, remembered, stored
from model_backend.core.paths import runtimes_dir
from model_backend.core.space import disk_full, no_space_error
from model_backend.nn.runtime import (
    EXPORT_BYTES,
    RUNTIMES,
    Runner,
    RuntimeSpec,
    cpu_threads,
    make_runner,
    probe_batch,
)

log = logging.getLogger(__name__)

CANDIDATES = ("openvino", "onnxruntime-defaults", "onnxruntime", "torch")
PREFERRED = "onnxruntime-defaults"
"""The yardstick: kept unless another candidate beats it by MARGIN."""
MARGIN = 0.03
"""How much faster than PREFERRED another runner must be to replace it (two equal ONNX Runtime sessions
read 0.97-1.03 of each other from one run to the next on a quiet 2-core machine)."""
BATCH = 32
"""Indexing's batch size."""
TOPIC_VERSION = 2
"""Bumped when the candidates change: a profile measured among other candidates is measured again."""
ROUNDS = 5
"""Rounds of a few batches per candidate, in turn, so drift and a noisy neighbour hit every candidate alike
(3 rounds of half a second each once picked OpenVINO at 0.92x ONNX Runtime)."""
TIMED = 2
"""Batches timed per candidate and round, after one untimed: a runtime's pool wakes up after another ran
(one batch each in strict alternation read OpenVINO 25 % slower than it runs alone)."""
TORCH_ROUNDS = 1
"""PyTorch eager is ~4x slower on CPU: one batch tells whether it could win at all."""


def select_runner(requested: str, net: nn.Module, spec: RuntimeSpec, device: torch.device,
                  threads: int | None = None, folder: Path | None = None) -> Runner | None:
    """The runner for `requested` on `device`, or None for PyTorch itself.

    'auto' can be overridden by $CDIKT_RUNTIME. CUDA always stays on PyTorch (bf16 autocast +
    channels_last there). A fast runtime that is missing or fails (export, load, agreement)
    falls back to the next fastest, then PyTorch, with a log line: slower is better than nothing.
    """
    if requested == "auto" and os.environ.get("CDIKT_RUNTIME", "auto") in RUNTIMES:
        requested = os.environ.get("CDIKT_RUNTIME", "auto")  # lets a user or the plugin's host force one
    if requested not in RUNTIMES:
        raise ValueError(f"Unknown runtime {requested!r}; choose one of {', '.join(RUNTIMES)}")
    if requested == "torch":
        return None
    if device.type != "cpu":
        if requested != "auto":
            log.warning("Runtime %s is for CPU; %s runs PyTorch", requested, device)
        return None
    if requested == "auto":
        return auto_runner(net, spec, threads, folder)
    runner = _try(requested, net, spec, threads, folder, logging.WARNING)
    if runner is None:
        log.warning("Falling back to PyTorch on CPU (requested runtime: %s)", requested)
    return runner


def auto_runner(net: nn.Module, spec: RuntimeSpec, threads: int | None = None,
                folder: Path | None = None) -> Runner | None:
    """The fastest runner measured on this machine for this network shape (measured now if never before)."""
    built: dict[str, Runner] = {}
    topic = runtime_topic(spec, threads)
    if env_world_size() > 1:  # ranks of one job share the cores: a measurement now would measure the others
        choice = stored(topic) or {"choice": PREFERRED, "tiles_per_s": {}}
    else:
        choice = remembered(topic, lambda: measure_runtimes(net, spec, threads, folder, built))
    rates = choice.get("tiles_per_s", {})
    order = [c for c in (choice.get("choice"),) if c in CANDIDATES] or [PREFERRED]
    order += sorted((k for k, v in rates.items() if v and k in CANDIDATES and k not in order), key=lambda k: -rates[k])
    order += [k for k in CANDIDATES if k not in order]
    for label in order:
        if label == "torch":
            if order[0] != "torch":
                log.warning("Falling back to PyTorch on CPU (no faster runtime usable)")
            log.info("CPU runtime: PyTorch (%s)", _figures(choice))
            return None
        runner = built.get(label) or _try(label, net, spec, threads, folder, logging.INFO)
        if runner is not None:
            how = "the fastest measured" if label == order[0] else "the fastest usable of those measured"
            log.info("CPU runtime: %s with %d threads, %s on this machine (%s; %s)", label, cpu_threads(threads),
                     how, _figures(choice), profile_path())
            return runner
    return None


def runtime_topic(spec: RuntimeSpec, threads: int | None) -> str:
    """What a measurement depends on besides the processor: the network's shape, threads, runtime versions."""
    versions = "-".join(f"{p}{_version(p)}" for p in ("openvino", "onnxruntime", "torch"))
    return (f"runtime/v{TOPIC_VERSION}/{spec.architecture}-{spec.pooling}-{spec.input_size}px-opset{spec.opset}/"
            f"threads{cpu_threads(threads)}/{versions}")


def measure_runtimes(net: nn.Module, spec: RuntimeSpec, threads: int | None = None, folder: Path | None = None,
                     built: dict[str, Runner] | None = None) -> dict[str, Any]:
    """Tiles/s of every candidate on one batch of BATCH probe images: median batch time, ROUNDS interleaved rounds.

    Runners made here are left in `built` for the caller to use. A candidate that cannot be made
    (not installed, export failed, disagrees with PyTorch) is reported with its reason, never chosen.
    """
    built = {} if built is None else built
    t_start = time.perf_counter()
    log.info("Measuring the CPU runtimes once for this machine (about 15 s)...")
    x = np.ascontiguousarray(probe_batch(spec.input_size, n=BATCH).numpy(), dtype=np.float32)
    runs: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for label in CANDIDATES:
        if label == "torch":
            xt = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            runs[label] = lambda xt=xt: _torch_forward(net, xt)
            continue
        try:
            built[label] = make_runner(label, net, spec, threads, folder)
            runs[label] = lambda r=built[label]: r(x)
        except Exception as exc:  # ImportError, export or agreement failure: not a candidate here
            _raise_if_disk_full(exc, folder)
            errors[label] = f"{type(exc).__name__}: {exc}"[:200]
    for fn in runs.values():  # warm-up: allocators, primitive caches, first-shape compilation
        fn()
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(ROUNDS):
        for label, fn in runs.items():
            if label == "torch" and r >= TORCH_ROUNDS:
                continue
            fn()
            for _ in range(1 if label == "torch" else TIMED):
                t0 = time.perf_counter()
                fn()
                times[label].append(time.perf_counter() - t0)
    rates = {k: round(BATCH / statistics.median(v), 2) for k, v in times.items()}
    result = {"choice": choose(rates), "tiles_per_s": {k: rates.get(k) for k in CANDIDATES}, "errors": errors,
              "batch": BATCH, "rounds": ROUNDS, "threads": cpu_threads(threads),
              "measured": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(time.perf_counter() - t_start, 1)}
    log.info("Measured CPU runtimes (tiles/s): %s; choosing %s", _figures(result), result["choice"])
    return result


def choose(rates: dict[str, float]) -> str:
    """The fastest candidate; PREFERRED (the yardstick) unless another beats it by MARGIN."""
    rates = {k: v for k, v in rates.items() if k in CANDIDATES and v}
    if not rates:
        return "torch"
    best = max(rates, key=rates.__getitem__)
    ref = rates.get(PREFERRED)
    if ref and best != PREFERRED and rates[best] < ref * (1.0 + MARGIN):
        return PREFERRED
    return best


def _try(label: str, net: nn.Module, spec: RuntimeSpec, threads: int | None, folder: Path | None,
         level: int) -> Runner | None:
    try:
        return make_runner(label, net, spec, threads, folder)
    except ImportError as exc:
        log.log(level, "Runtime %s is not installed (%s)", label, exc)
    except Exception as exc:  # export or runtime failure: never fatal, PyTorch still works
        _raise_if_disk_full(exc, folder)
        log.warning("Runtime %s unusable (%s: %s)", label, type(exc).__name__, str(exc)[:200])
    return None


def _raise_if_disk_full(exc: Exception, folder: Path | None) -> None:
    cache = folder or runtimes_dir()
    if disk_full(exc, cache.parent if not cache.exists() else cache):  # a full cache would fail later anyway
        raise no_space_error(cache, EXPORT_BYTES, "the model's CPU export",
                             "Free some space or set another cache folder (CDIKT_CACHE_DIR).") from None


def _torch_forward(net: nn.Module, x: torch.Tensor) -> None:
    with torch.inference_mode():
        net(x)


def _figures(choice: dict[str, Any]) -> str:
    rates = choice.get("tiles_per_s", {})
    parts = [f"{k} {v:.0f} tiles/s" for k, v in sorted(rates.items(), key=lambda kv: -(kv[1] or 0)) if v]
    return ", ".join(parts) or "nothing measured"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "none"

