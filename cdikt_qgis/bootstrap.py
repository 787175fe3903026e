"""Make the engine and torch reachable from QGIS's Python without disturbing anything else in it.

QGIS runs every plugin in one interpreter, beside its own core plugins (``processing``,
``grassprovider``, ``sagaprovider``) and whatever else the user installed. So this module obeys
two rules learnt the hard way:

* Only ``model_backend`` becomes a top-level name. It ships in ``<plugin>/libs/``, a folder that
  holds nothing else; the plugin folder itself is never put on ``sys.path`` (it did once, and
  our ``processing`` subpackage hid QGIS's own Processing framework).
* triton never loads inside QGIS. The CUDA build of torch brings it, ``torchvision.ops`` pulls it
  in through ``torch._dynamo``, and its bundled LLVM segfaults as soon as Mesa's ``libLLVM`` is
  in the process, which the desktop always has (OpenGL). The engine runs eagerly and never
  compiles kernels, so blocking triton costs nothing; CUDA itself keeps working.
"""

from __future__ import annotations

import glob
import importlib.util
import logging
import os
import site
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENGINE = "model_backend"
LIBS = "libs"
"""The folder inside the plugin that holds the engine package and nothing else."""
ALLOW_TRITON_ENV = "CDIKT_ALLOW_TRITON"


def plugin_dirs() -> list[Path]:
    """The plugin folder as QGIS sees it and the checkout it really lives in.

    ``make install`` links the profile's plugin folder to a staging folder whose files are
    themselves links into the checkout, so only resolving this file (not its folder) finds
    the repository root and its .venv.
    """
    here = Path(__file__)
    return list(dict.fromkeys([here.absolute().parent, here.resolve().parent]))


def engine_libs_dir() -> Path | None:
    """``<plugin>/libs`` when it holds the engine (zip and ``make install`` layouts)."""
    for plugin_dir in plugin_dirs():
        libs = plugin_dir / LIBS
        if (libs / ENGINE / "__init__.py").is_file():
            return libs
    return None


def ensure_engine_importable() -> None:
    """Put ``<plugin>/libs`` on ``sys.path`` when ``model_backend`` is not importable yet.

    A checkout run from its root (tests, the CLI) already has it; the installed plugin does not.
    """
    if importlib.util.find_spec(ENGINE) is not None:
        return
    libs = engine_libs_dir()
    if libs is None:
        raise ImportError(
            f"The CDIKT engine ({ENGINE}) is not inside the plugin folder: reinstall the plugin from its zip "
            "(or with `make install` from a checkout).", name=ENGINE)
    sys.path.insert(0, str(libs))
    importlib.invalidate_caches()


def block_triton() -> bool:
    """Make ``import triton`` fail cleanly (and ``find_spec`` answer None) in this process.

    Returns whether triton is now blocked. Set CDIKT_ALLOW_TRITON=1 to opt out (e.g. a QGIS
    without OpenGL where a user wants ``torch.compile``). Too late once triton is imported.
    """
    if os.environ.get(ALLOW_TRITON_ENV) == "1":
        return False
    if "triton" in sys.modules:
        if sys.modules["triton"] is not None:
            log.warning("triton was already imported by another plugin; QGIS may crash when OpenGL is loaded.")
            return False
        return True
    # A None entry: `import triton` raises ImportError and importlib.util.find_spec returns None,
    # which is what torch checks before it would use triton (torch.cuda, dynamo, inductor).
    sys.modules["triton"] = None  # type: ignore[assignment]
    # CUDA builds of torch then warn on stderr that flop counting cannot see triton kernels: true,
    # expected, and of no use to an analyst.
    logging.getLogger("torch.utils.flop_counter").setLevel(logging.ERROR)
    return True


def site_packages_candidates() -> list[str]:
    """Where a torch-holding env may be: settings, then env var, then the repo's .venv."""
    out: list[str] = []
    from .settings import CdiktSettings  # QgsSettings only: no torch, no engine

    configured = CdiktSettings().python_site_packages
    if configured:
        out.append(configured)
    env = os.environ.get("CDIKT_SITE_PACKAGES")
    if env:
        out.extend(p for p in env.split(os.pathsep) if p)
    want = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for plugin_dir in plugin_dirs():
        found = sorted(glob.glob(str(plugin_dir.parent / ".venv" / "lib" / "python3.*" / "site-packages")))
        # the env built for this Python first; another minor version rarely works but is a hint
        found.sort(key=lambda p: want not in p)
        out.extend(found)
    return list(dict.fromkeys(out))


def add_site_dir_before_system(path: str) -> None:
    """Put an env's site-packages (and its .pth entries) just before the system's site-packages.

    That is the order the env's own interpreter uses. Appended, it loses to older system copies of
    torch's pure-Python deps (Debian's sympy 1.11 vs torch's sympy>=1.13: torchvision then fails to
    import torch._dynamo). numpy is imported first so QGIS's own numpy, the one GDAL's bindings are
    built against, stays the one in use.
    """
    try:
        import numpy  # noqa: F401
    except ImportError:
        pass
    before = list(sys.path)
    site.addsitedir(path)
    added = [p for p in sys.path if p not in before]
    first_site = next((i for i, p in enumerate(before)
                       if p.rstrip("/").endswith(("site-packages", "dist-packages"))), len(before))
    sys.path[:] = before[:first_site] + added + before[first_site:]
    importlib.invalidate_caches()


def ensure_torch_importable() -> None:
    """Add a configured env's site-packages when torch is not importable as installed."""
    if importlib.util.find_spec("torch") is not None:
        return
    for candidate in site_packages_candidates():
        if os.path.isdir(candidate) and candidate not in sys.path:
            add_site_dir_before_system(candidate)
            if importlib.util.find_spec("torch") is not None:
                return


def prepare() -> None:
    """Everything classFactory needs before the plugin module is imported; imports no torch."""
    block_triton()
    ensure_engine_importable()
    ensure_torch_importable()
