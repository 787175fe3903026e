"""This machine's processor, and the choices measured on it once (CPU runtime, scoring precision).

The fastest way to run a network or a matrix product on a CPU depends on the processor: the
same OpenVINO build that beat ONNX Runtime by 1.25x on one 2-core machine lost to it by 10 % on
another, and bf16 products that run at memory speed with AVX512-BF16 are emulated without it.
A rule written on the developers' machine picks wrong on the user's, so the engine measures the
candidates on the user's machine, once, and remembers the answer here, keyed by the processor's
identity (model name, the instruction-set flags that change which kernels exist, usable cores)
so a profile copied to another machine, or a VM moved to another host, is never reused blind.

No torch: the CLI's `machine` command and the bench read this without loading a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from model_backend.core.atomic import atomic_write_bytes
from model_backend.core.paths import default_cache_dir

log = logging.getLogger(__name__)

PROFILE_FORMAT = 1
KEY_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512vl",
             "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd")
"""The flags that decide which fast kernels a CPU has (fp16 conversion, bf16/int8 dot products, AMX)."""


@dataclass(frozen=True)
class CpuIdentity:
    """What a measured choice depends on; two machines that differ here are measured apart."""

    model: str
    flags: tuple[str, ...]
    cores: int
    """Cores this process may use (affinity), not the host's: a container given 2 of 64 cores is a 2-core machine."""
    arch: str

    @property
    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "flags": list(self.flags), "cores": self.cores, "arch": self.arch,
                "key": self.key}

    def describe(self) -> str:
        return f"{self.model} ({self.cores} cores; {' '.join(self.flags) or 'no listed flags'})"


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


@lru_cache(maxsize=1)
def cpu_identity() -> CpuIdentity:
    """The processor as /proc/cpuinfo names it on Linux (platform's answer elsewhere), with its key flags."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in ("model name", "hardware", "cpu model") and not model:
                    model = value.strip()
                elif name in ("flags", "features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    return CpuIdentity(model, tuple(f for f in KEY_FLAGS if f in flags), usable_cores(), platform.machine())


def machine_dir() -> Path:
    """Measured choices: $CDIKT_MACHINE_DIR, else `machine/` in the cache (it outlives `cache --prune`'s indexes)."""
    env = os.environ.get("CDIKT_MACHINE_DIR")
    return Path(env) if env else default_cache_dir() / "machine"


def profile_path() -> Path:
    return machine_dir() / f"{cpu_identity().key}.json"


def profile() -> dict[str, Any]:
    """This machine's identity and every choice measured on it so far (empty choices when none)."""
    stored = _read(profile_path())
    return {"format": PROFILE_FORMAT, "cpu": cpu_identity().to_dict(), "choices": stored.get("choices", {})}


def stored(topic: str) -> dict[str, Any] | None:
    """The choice stored for `topic` on this machine, or None (nothing is measured)."""
    found = _read(profile_path()).get("choices", {}).get(topic)
    return found if isinstance(found, dict) else None


def remembered(topic: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """The choice stored for `topic` on this machine, measured with `measure()` the first time.

    `topic` names what was measured and everything its answer depends on besides the CPU (e.g.
    `runtime/mobilenet_v2-gem-224px/threads2/ov2025.1-ort1.22`). Two processes measuring at once
    both write; the file is replaced atomically, so the last one wins and nothing is half-written.
    A profile that cannot be written (read-only cache) is logged and the measurement still used.
    """
    found = stored(topic)
    if found is not None:
        return found
    path = profile_path()
    result = measure()
    latest = _read(path)  # again: another process may have added a topic meanwhile
    choices = {**latest.get("choices", {}), topic: result}
    data = {"format": PROFILE_FORMAT, "cpu": cpu_identity().to_dict(), "choices": choices}
    try:
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError as exc:
        log.warning("Could not save the measured choice for %s in %s (%s); it will be measured again next time",
                    topic, path, exc)
    return result


def forget(topic_prefix: str = "") -> int:
    """Drop the stored choices whose topic starts with `topic_prefix` (all by default); returns how many."""
    path = profile_path()
    data = _read(path)
    choices = data.get("choices", {})
    kept = {k: v for k, v in choices.items() if not k.startswith(topic_prefix)}
    if len(kept) != len(choices):
        atomic_write_bytes(path, json.dumps({**data, "choices": kept}, indent=1, sort_keys=True).encode())
    return len(choices) - len(kept)


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("format") != PROFILE_FORMAT:
        return {}  # another version's profile: measure again rather than trust its layout
    return data
