"""Sharded indexing and DDP training: torchrun with 2 gloo ranks, the single-process commands unchanged.

The real launcher in a subprocess (`python -m torch.distributed.run --standalone
--nproc_per_node 2 -m model_backend index ...`, i.e. torchrun), on a real raster cut into small
chunks so both ranks get several; plus the transfer of chunks to rank 0 when ranks do not
share a cache folder (separate nodes), with two spawned gloo processes. Training: the same
launcher runs `train` on a tiny simulated dataset, both stages under DDP.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from model_backend.core.dist import Shard, init_distributed, is_main
from model_backend.geo.tiling import TileGrid
from model_backend.index.build import gather_parts
from model_backend.index.sharded import compare_indexes
from model_backend.index.store import IndexWriter, TileIndex
from model_backend.learn.datasets import write_university_layout
from model_backend.learn.training import load_checkpoint
from model_backend.nn.embedder import EmbeddingModel

ROOT = Path(__file__).resolve().parents[2]
FOOTPRINT = "30"  # Manila sample (205 m a side): 12 x 12 tiles


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR")}
    env.update({"PYTHONPATH": str(ROOT), "GDAL_PAM_ENABLED": "NO", "CDIKT_CHUNK_TILES": "24"}, **extra)
    return env


def _index(cmd: list[str], cache: Path) -> tuple[TileIndex, dict]:
    proc = subprocess.run([*cmd, "--cache-dir", str(cache)], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    out = json.loads(lines[0])
    return TileIndex.open(Path(out["index"])), out


def test_torchrun_two_ranks_equal_single_process(tmp_path: Path, data_dir: Path) -> None:
    raster = str(data_dir / "manila_oam_0.10m.tif")
    args = ["-m", "model_backend", "index", raster, "--footprint-m", FOOTPRINT]
    single, _ = _index([sys.executable, *args], tmp_path / "single")
    sharded, out = _index([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args], tmp_path / "sharded")
    assert out["world_size"] == 2 and sharded.manifest["world_size"] == 2
    assert sharded.folder.name == single.folder.name  # same key: same raster, tiling and model
    # 12 x 12 regular tiles, plus the edge-aligned last column and row
    assert single.grid.n_tiles == 169 and single.n_tiles > 100 and single.manifest["world_size"] == 1
    cmp = compare_indexes(single, sharded)
    assert cmp["same_tiles"], cmp
    assert cmp["equal_within_fp16"] and cmp["min_cosine"] > 0.9999, cmp
    assert not (sharded.folder / "parts").exists()


def test_torchrun_trains_fewshot_with_two_ranks(tmp_path: Path, data_dir: Path) -> None:
    """`train` under torchrun on 2 CPU processes (gloo): fewshot, so both stages run under DDP (CDIS
    pairs split between the ranks; CDTS embedded by both, clustered by rank 0, memories updated
    from both ranks' batches). Rank 0 alone reports and writes; the ranks end with equal weights.
    """
    rasters = [str(data_dir / r) for r in ("manila_oam_0.10m.tif", "netherlands_aerial_0.25m_epsg28992.tif")]
    data = write_university_layout(rasters, tmp_path / "u1652", 12, 4, seed=1, footprint_m=20.0, size=64,
                                   test_fraction=0.25)  # 9 training locations x 4 drone views
    out = tmp_path / "ddp.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "model_backend", "train", "--layout", "university1652", "--data", str(data), "--mode", "fewshot",
           "--paired-fraction", "0.5", "--steps", "6", "--batch-size", "4", "--input-size", "64",
           "--cdts-epochs", "2", "--out", str(out), "--workers", "0", "--threads", "1", "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, proc.stdout  # rank 0 alone reports
    summary = json.loads(lines[0])
    # CDTS's default epoch is one pass over the 36 drone images for the job: 36 // (4 per view x 2 ranks)
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True, summary
    assert summary["steps"] == 6 + 2 * (36 // (4 * 2)) and not summary["stopped"], summary
    ckpt = load_checkpoint(summary["checkpoint"])
    held = {k: v for k, v in ckpt["model"].items() if k.startswith("backbone.")}
    written = load_file(out)
    assert written.keys() == held.keys() and all(torch.equal(written[k], held[k]) for k in held)
    cdis = [h["loss"] for h in ckpt["history"] if h["stage"] == 0]
    assert len(cdis) == 6 and np.mean(cdis[-2:]) < np.mean(cdis[:2]), cdis
    net = EmbeddingModel.load(str(out), "cpu", runtime="torch")
    emb = net.embed(net.normalise(np.zeros((1, 64, 64, 3), np.uint8)))
    assert net.meta.input_size == 64 and abs(float(np.linalg.norm(emb)) - 1.0) < 1e-4


def _gather_worker(rank: int, world: int, init_file: str, folders: list[str], result: str) -> None:
    """One rank: its own folder (no shared disk), its chunks saved there, then gather_parts."""
    import torch.distributed as dist

    os.environ.update({"WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    r, w, dev = init_distributed("cpu")  # already initialised: reports the group
    assert (r, w, dev.type) == (rank, world, "cpu") and is_main() == (rank == 0)
    writer = IndexWriter(Path(folders[rank]), _grid(), chunk_rows=1)
    shard = Shard(rank, world)
    for chunk in range(writer.n_chunks):
        if shard.owns(chunk):
            writer.save_chunk(chunk, np.arange(3), np.full(3, chunk), np.full((3, 4), chunk, np.float16))
    gather_parts(writer, shard)
    if rank == 0:
        Path(result).write_text(json.dumps(sorted(writer.done_chunks())))
    dist.destroy_process_group()


def _grid() -> TileGrid:
    return TileGrid(crs_wkt="", transform=(0.0, 1.0, 0.0, 0.0, 0.0, -1.0), raster_width=8, raster_height=10,
                    tile_w=4, tile_h=4, step_x=2, step_y=2, cells_per_tile=2, n_cols=3, n_rows=4, footprint_m=4.0)


@pytest.mark.timeout(120)
def test_gather_parts_sends_chunks_without_shared_folder(tmp_path: Path) -> None:
    folders = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    result = tmp_path / "chunks.json"
    mp.start_processes(_gather_worker, args=(2, str(tmp_path / "init"), folders, str(result)), nprocs=2,
                       start_method="spawn")
    assert json.loads(result.read_text()) == [0, 1, 2, 3]  # rank 0 now holds rank 1's chunks 1 and 3
    writer = IndexWriter(Path(folders[0]), _grid(), chunk_rows=1)
    with np.load(writer.part_path(3)) as z:
        assert np.all(z["emb"] == 3) and np.all(z["rows"] == 3)


def test_not_distributed_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    rank, world, dev = init_distributed("cpu")
    assert (rank, world, dev.type) == (0, 1, "cpu") and is_main()
    assert Shard().owns(5) and Shard(1, 2).owns(3) and not Shard(1, 2).owns(2)
