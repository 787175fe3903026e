"""CPU inference runtimes: the same network, run by an engine built for CPU inference.

Indexing is the step an analyst waits for, and on CPU plain PyTorch eager leaves most of the
machine's speed unused (MobileNetV2 at 224 px: eager 34 ms/tile, ONNX Runtime 6.3 ms on two
cores). So the inference graph (backbone + GeM + L2 norm) is exported to ONNX once per weights
file and run by OpenVINO or ONNX Runtime, both in fp32: the embeddings agree with PyTorch to
cosine > 0.99999, which is why the index key does not depend on the runtime. bf16 (AMX) was
measured and rejected: 2-3x faster, but cosine only ~0.98 against fp32 on real tiles.

The ONNX file is cached under the user cache dir, keyed by the weights' sha256, input size and
opset; export is local (no download). Every runner is checked against PyTorch on a probe batch
when it is created, so a bad export or a runtime bug falls back to PyTorch instead of silently
producing an index that does not match the query side.

Indexing feeds the runners uint8 tiles (`uint8_runner`): the ImageNet normalisation is three
nodes (Cast, Mul, Add) put in front of the same graph, so the reader thread, which shares the
two cores with the model, no longer writes 4 bytes per input value. Reading + normalising was
0.5-0.6 ms of CPU per tile against ~0.25 ms for reading alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from model_backend.core.atomic import atomic_path, atomic_save_npy
from model_backend.core.config import RUNTIME_NAMES
from model_backend.core.paths import runtimes_dir

log = logging.getLogger(__name__)

RUNTIMES = RUNTIME_NAMES
"""Values of `ModelConfig.runtime`. 'auto' runs the one measured fastest on this machine (nn.runtime_select)."""
ONNX_OPSET = 18
MIN_AGREEMENT = 0.999
"""Smallest cosine allowed between a runner's embedding and PyTorch's on the probe batch."""


class Runner(Protocol):
    """(B, 3, H, W) float32 C-contiguous normalised images -> (B, D) float32 unit vectors."""

    name: str

    def __call__(self, x: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class RuntimeSpec:
    """What the exported graph depends on: change any of these and the ONNX file is another one."""

    weights_sha256: str
    input_size: int
    architecture: str = "mobilenet_v2"
    pooling: str = "gem"
    opset: int = ONNX_OPSET

    @property
    def filename(self) -> str:
        return (f"{self.architecture}-{self.pooling}-{self.weights_sha256[:16]}-"
                f"{self.input_size}px-opset{self.opset}.onnx")


EXPORT_BYTES = 64 << 20
"""About what a model's ONNX export and its probe take in the cache (a full disk is reported with it)."""

def cpu_threads(threads: int | None = None) -> int:
    """Intra-op threads: the caller's, else OMP_NUM_THREADS (torchrun sets it per rank), else the usable cores.

    One pool as wide as the cores, not more: the reader thread mostly waits in GDAL (which
    releases the GIL) and a wider pool only adds context switches on a small machine.
    """
    if threads:
        return max(1, int(threads))
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def export_onnx(net: nn.Module, spec: RuntimeSpec, folder: Path | None = None) -> Path:
    """The cached ONNX file of `net` (dynamic batch), exporting it on first use.

    Beside it, `<name>.probe.npy` holds PyTorch's embeddings of `probe_batch`, so every later
    load checks the runner against PyTorch without running PyTorch (its first CPU forward costs
    seconds of oneDNN warm-up). Both are written beside their final names and renamed, so
    concurrent processes (torchrun ranks, the plugin and a CLI run) never read half a file. The
    dynamo exporter is tried first (needs onnxscript); the TorchScript exporter is the fallback.
    """
    folder = folder or runtimes_dir()
    path = folder / spec.filename
    if path.is_file() and probe_path(path).is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    was_training = net.training
    net = net.eval()
    with torch.inference_mode():
        ref = net(probe_batch(spec.input_size).to(next(net.parameters()).device)).float().cpu().numpy()
    atomic_save_npy(probe_path(path), ref)
    example = torch.zeros(2, 3, spec.input_size, spec.input_size)
    errors = []
    try:
        with atomic_path(path) as tmp:
            for dynamo in (True, False):
                try:
                    _export(net, example, tmp, spec.opset, dynamo)
                    break
                except Exception as exc:  # ImportError (no onnxscript), export errors: try the other exporter
                    errors.append(f"{'dynamo' if dynamo else 'torchscript'}: {type(exc).__name__}: {exc}"[:300])
            else:
                raise RuntimeError("ONNX export failed; " + " | ".join(errors))
    finally:
        net.train(was_training)
    log.info("Exported the model to %s", path)
    return path


def probe_path(onnx_path: Path) -> Path:
    return onnx_path.with_suffix(".probe.npy")


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """The exporters print progress to stdout (the CLI's stdout is reserved for JSON results) and
    log hundreds of INFO lines through onnxscript/onnx_ir; none of it is for an analyst."""
    loggers = [logging.getLogger(n) for n in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(net: nn.Module, example: torch.Tensor, out: str, opset: int, dynamo: bool) -> None:
    with _quiet_export(), torch.no_grad():
        if dynamo:
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(net, (example,), out, input_names=["images"], output_names=["embeddings"],
                              dynamic_shapes={"x": {0: batch}}, opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        else:
            torch.onnx.export(net, (example,), out, input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                              opset_version=min(opset, 17), dynamo=False)


Normalisation = tuple[tuple[float, ...], tuple[float, ...]]
"""(mean, std) per RGB channel on the 0-1 scale, as in `ModelMeta`."""


def normalise_nchw(images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """(B, 3, H, W) uint8 -> float32 `x * 1/(255 std) - mean/std`: the arithmetic of `EmbeddingModel.normalise`.

    The same two float32 operations, in the same order, as the nodes `uint8_input_graph` adds,
    so a runner fed uint8 sees the very input values the float path would have given it.
    """
    scale, shift = scale_shift(mean, std)
    out = np.multiply(images, scale.reshape(1, 3, 1, 1), dtype=np.float32)
    out += shift.reshape(1, 3, 1, 1)
    return out


def scale_shift(mean: tuple[float, ...], std: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """float32 (1/(255 std), -mean/std) per channel: normalisation as one multiply and one add, wherever it runs."""
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    return (1.0 / (255.0 * s)).astype(np.float32), (-m / s).astype(np.float32)


def uint8_input_graph(path: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> bytes:
    """The exported graph with a (B, 3, H, W) uint8 input: Cast -> Mul(1/(255 std)) -> Add(-mean/std) in front.

    Built in memory from the cached file (cheap next to compiling it; nothing more is cached): the float graph
    stays what every other caller runs, this one is only for indexing's reader.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    old = g.input[0]
    new = onnx.ValueInfoProto()
    new.CopyFrom(old)
    new.name = f"{old.name}_uint8"
    new.type.tensor_type.elem_type = TensorProto.UINT8
    scale, shift = scale_shift(mean, std)
    g.initializer.extend([numpy_helper.from_array(scale.reshape(1, 3, 1, 1), "cdikt_u8_scale"),
                          numpy_helper.from_array(shift.reshape(1, 3, 1, 1), "cdikt_u8_shift")])
    nodes = [helper.make_node("Cast", [new.name], ["cdikt_u8_float"], to=TensorProto.FLOAT, name="cdikt_u8_cast"),
             helper.make_node("Mul", ["cdikt_u8_float", "cdikt_u8_scale"], ["cdikt_u8_scaled"], name="cdikt_u8_mul"),
             helper.make_node("Add", ["cdikt_u8_scaled", "cdikt_u8_shift"], [old.name], name="cdikt_u8_add")]
    g.input.remove(old)
    g.input.insert(0, new)
    for i, node in enumerate(nodes):  # nodes are topologically sorted: these come first
        g.node.insert(i, node)
    return model.SerializeToString()


class OnnxRuntimeRunner:
    """ONNX Runtime, CPU execution provider, fp32, in one of two `mode`s:

    - `tuned`: one intra-op pool of `threads`, no spinning (the reader thread keeps its core);
    - `defaults`: batches run by a session exactly as a user would open it (the bench's yardstick),
      small calls (a photo's SMALL_BATCH crops) by a twin that stops spinning when a run returns.
      The plain defaults keep their workers spinning after a run: harmless between indexing's
      back-to-back batches, but the scoring that follows a photo's embedding took 33-53 ms instead
      of 16-18 ms on a 2-core machine.
    """

    name = "onnxruntime"
    LABELS = {"tuned": "onnxruntime", "defaults": "onnxruntime-defaults"}
    SMALL_BATCH = 16

    def __init__(self, path: Path, threads: int, spinning: bool = False, model_bytes: bytes | None = None,
                 mode: str = "tuned") -> None:
        if mode not in self.LABELS:
            raise ValueError(f"Unknown ONNX Runtime mode {mode!r}")
        self.path, self.threads, self.spinning, self.mode = path, threads, spinning, mode
        self.model_bytes = model_bytes
        self.label = self.LABELS[mode]
        self.session = self._session(stop_spinning=False)
        self.input = self.session.get_inputs()[0].name
        self._small = None

    def _session(self, stop_spinning: bool):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.log_severity_level = 3
        if self.mode == "tuned":
            so.intra_op_num_threads = self.threads
            so.inter_op_num_threads = 1
            so.add_session_config_entry("session.intra_op.allow_spinning", "1" if self.spinning else "0")
        elif stop_spinning:
            so.add_session_config_entry("session.force_spinning_stop", "1")
        return ort.InferenceSession(self.model_bytes or str(self.path), so, providers=["CPUExecutionProvider"])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.mode == "defaults" and len(x) <= self.SMALL_BATCH:
            if self._small is None:
                self._small = self._session(stop_spinning=True)
            return self._small.run(None, {self.input: x})[0]
        return self.session.run(None, {self.input: x})[0]

    def with_uint8_input(self, mean: tuple[float, ...], std: tuple[float, ...]) -> OnnxRuntimeRunner:
        """The same session settings on `uint8_input_graph`: takes (B, 3, H, W) uint8."""
        return OnnxRuntimeRunner(self.path, self.threads, self.spinning, uint8_input_graph(self.path, mean, std),
                                 self.mode)


class OpenVinoRunner:
    """OpenVINO CPU plugin in fp32, a batch split into `requests_per_stream` parts per stream (throughput mode).

    The precision hint must be f32: on AMX/AVX512_BF16 processors OpenVINO runs bf16 by default,
    which moved embeddings to cosine ~0.98 of fp32 on real tiles. Two parts per stream rather
    than one let a stream that finished early take the next part, which matters on a shared
    machine: paired with ONNX Runtime batch by batch here it was 1.25x faster (1.17x with one).
    """

    name = "openvino"
    label = "openvino"

    def __init__(self, path: Path, threads: int, streams: int | None = None, requests_per_stream: int = 2,
                 model_bytes: bytes | None = None) -> None:
        import openvino as ov

        self.path, self.threads, self.streams, self.requests_per_stream = path, threads, streams, requests_per_stream
        core = ov.Core()
        config: dict[str, object] = {
            "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "THROUGHPUT",
            "INFERENCE_NUM_THREADS": threads, "ENABLE_CPU_PINNING": False,
        }
        if streams:
            config["NUM_STREAMS"] = streams
        source = io.BytesIO(model_bytes) if model_bytes else str(path)
        self.compiled = core.compile_model(core.read_model(source), "CPU", config)
        n = max(1, int(self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))) * max(1, requests_per_stream)
        self.requests = [self.compiled.create_infer_request() for _ in range(n)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        parts = [p for p in np.array_split(x, min(len(self.requests), max(1, len(x)))) if len(p)]
        used = self.requests[:len(parts)]
        for req, part in zip(used, parts):
            req.start_async({0: np.ascontiguousarray(part)})
        outs = []
        for req in used:
            req.wait()
            outs.append(np.array(req.get_output_tensor(0).data, dtype=np.float32, copy=True))
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def with_uint8_input(self, mean: tuple[float, ...], std: tuple[float, ...]) -> OpenVinoRunner:
        """The same settings on `uint8_input_graph`: takes (B, 3, H, W) uint8 (made + checked in ~0.4 s)."""
        return OpenVinoRunner(self.path, self.threads, self.streams, self.requests_per_stream,
                              uint8_input_graph(self.path, mean, std))


RUNNERS: dict[str, Callable[..., Runner]] = {"openvino": OpenVinoRunner, "onnxruntime": OnnxRuntimeRunner}
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "openvino": ("openvino", {}), "onnxruntime": ("onnxruntime", {}),
    "onnxruntime-defaults": ("onnxruntime", {"mode": "defaults"}),
}
"""Every runner `auto` may measure, by label: (runtime, its factory's settings)."""


def probe_batch(size: int, n: int = 4, seed: int = 0) -> torch.Tensor:
    """Deterministic smooth images (not white noise, which exaggerates rounding differences)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, max(2, size // 16), max(2, size // 16), generator=g)
    img = nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return ((img - 0.45) / 0.25).contiguous()


def probe_images_uint8(size: int, n: int = 4, seed: int = 0) -> np.ndarray:
    """`probe_batch`'s smooth images as (n, 3, size, size) uint8, for checking a runner fed uint8."""
    img = probe_batch(size, n, seed).numpy() * 0.25 + 0.45
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    num = np.sum(a * b, axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float(np.min(num / den))


def agreement(runner: Runner, onnx_path: Path, input_size: int) -> float:
    """Smallest cosine between the runner's embeddings of the probe batch and PyTorch fp32's (saved at export)."""
    ref = np.load(probe_path(onnx_path))
    return min_cosine(ref, runner(np.ascontiguousarray(probe_batch(input_size).numpy(), dtype=np.float32)))


def uint8_runner(runner: Runner, mean: tuple[float, ...], std: tuple[float, ...],
                 input_size: int) -> Runner | None:
    """`runner`'s network taking (B, 3, H, W) uint8 RGB, with `(x/255 - mean)/std` done in its graph; None if
    the runtime cannot (a test double, a failed build or check: the caller then normalises, as before).

    Made once per (runner, mean, std) and kept on the runner. Checked like every runner: on the
    probe images its embeddings must match the float runner's on the same images normalised in
    numpy (cosine >= MIN_AGREEMENT), and the float runner was itself checked against PyTorch.
    """
    cache: dict[Normalisation, Runner | None] = runner.__dict__.setdefault("_uint8_runners", {})
    key = (tuple(float(v) for v in mean), tuple(float(v) for v in std))
    if key in cache:
        return cache[key]
    made: Runner | None = None
    make = getattr(runner, "with_uint8_input", None)
    if make is not None:
        try:
            candidate = make(*key)
            probe = probe_images_uint8(input_size)
            cos = min_cosine(runner(normalise_nchw(probe, *key)), candidate(probe))
            if not cos >= MIN_AGREEMENT:  # NaN fails too
                raise RuntimeError(f"uint8 input disagrees with float input (cosine {cos:.5f} < {MIN_AGREEMENT})")
            made = candidate
        except Exception as exc:  # never fatal: the float path still works
            log.warning("%s with uint8 input unusable (%s: %s); normalising in the reader", runner.name,
                        type(exc).__name__, str(exc)[:200])
    cache[key] = made
    return made


def make_runner(name: str, net: nn.Module, spec: RuntimeSpec, threads: int | None = None,
                folder: Path | None = None) -> Runner:
    """One runtime (name or `VARIANTS` label) over the cached export, checked against PyTorch; raises if not usable."""
    if name not in VARIANTS:
        raise ValueError(f"Unknown runtime {name!r}; choose one of {', '.join(RUNTIMES)}")
    runtime, settings = VARIANTS[name]
    factory = RUNNERS[runtime]
    path = export_onnx(net, spec, folder)
    runner = factory(path, cpu_threads(threads), **settings)
    cos = agreement(runner, path, spec.input_size)
    if not cos >= MIN_AGREEMENT:  # NaN (a damaged export) fails too; the export is made again next time
        for stale in (path, probe_path(path)):
            stale.unlink(missing_ok=True)
        raise RuntimeError(f"{name} disagrees with PyTorch (cosine {cos:.5f} < {MIN_AGREEMENT}); its cached "
                           "export was removed")
    return runner


def runner_label(runner: Runner | None) -> str:
    """The `VARIANTS` label of a runner ('torch' for None): what `auto` measured and chose."""
    return "torch" if runner is None else str(getattr(runner, "label", runner.name))
