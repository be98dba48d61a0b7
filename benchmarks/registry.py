"""Registry throughput: import and export of a real-shaped random model (GPT-2-medium, 1.4 GB float32)
against plain `safetensors.torch.save_file` of the same state dict, and the disk cost of a child version
that changes 1% of the parameters. Then factored against dense children: 10 MEMIT edits' worth of change
(rank 10 per matrix) on GPT-J's 5 edited MLP matrices (fc_out of layers 3-8 in the reference: 5 x 4096 x
16384 float32, 1.3 GB, random weights), their bytes and load times. Prints JSON.

    python benchmarks/registry.py [--quick] [--factored-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

import modelzoo


def gpt2_shaped_state_dict(n_layer: int, d: int, vocab: int = 50257, positions: int = 1024) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    sd = {"transformer.wte.weight": rand(vocab, d), "transformer.wpe.weight": rand(positions, d)}
    for i in range(n_layer):
        p = f"transformer.h.{i}."
        sd |= {
            p + "ln_1.weight": torch.ones(d), p + "ln_1.bias": torch.zeros(d),
            p + "attn.c_attn.weight": rand(d, 3 * d), p + "attn.c_attn.bias": rand(3 * d),
            p + "attn.c_proj.weight": rand(d, d), p + "attn.c_proj.bias": rand(d),
            p + "ln_2.weight": torch.ones(d), p + "ln_2.bias": torch.zeros(d),
            p + "mlp.c_fc.weight": rand(d, 4 * d), p + "mlp.c_fc.bias": rand(4 * d),
            p + "mlp.c_proj.weight": rand(4 * d, d), p + "mlp.c_proj.bias": rand(d),
        }
    sd |= {"transformer.ln_f.weight": torch.ones(d), "transformer.ln_f.bias": torch.zeros(d)}
    return sd


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def factored_vs_dense(work: Path, edits: int = 10, matrices: int = 5, shape: tuple[int, int] = (4096, 16384),
                      repeats: int = 3) -> dict[str, object]:
    """A MEMIT-sized change of GPT-J's MLP output projections stored dense and as factors: bytes added, and
    the time to load each child's tensors (hashes checked; the factored child merged), best of `repeats`
    with a warm page cache."""
    from modelzoo.registry.factors import LowRank

    g = torch.Generator().manual_seed(0)
    names = [f"transformer.h.{3 + i}.mlp.fc_out.weight" for i in range(matrices)]
    source = work / "gptj-mlp"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"family": "lm"}))
    save_file({n: torch.randn(*shape, generator=g) * 0.02 for n in names}, source / "model.safetensors")
    changes = {n: LowRank(torch.randn(shape[0], edits, generator=g) * 1e-3, torch.randn(edits, shape[1], generator=g))
               for n in names}
    # Two registries: in one, the dense tensors would be found already stored (as the factored child's).
    zoo, dense_zoo = modelzoo.open(work / "zoo-factored"), modelzoo.open(work / "zoo-dense")
    parent = zoo.import_(source, "gptj-mlp")
    factored = zoo.commit(parent.ref, changes, "memit", name="factored")
    dense_values = zoo.tensors(factored.ref)
    dense = dense_zoo.commit(dense_zoo.import_(source, "gptj-mlp").ref, dense_values, "memit", name="dense")
    assert dense.manifest_hash == factored.manifest_hash  # the same tensors, however they are stored
    changed_bytes = sum(t.nbytes for t in dense_values.values())
    del dense_values

    def load_s(registry: modelzoo.Zoo, ref: str) -> tuple[float, float]:
        """Best wall-clock and CPU seconds (all threads) of loading every tensor."""
        runs = []
        for _ in range(repeats):
            cpu = time.process_time()
            wall = timed(lambda: registry.tensors(ref))
            runs.append((wall, time.process_time() - cpu))
        return min(runs)

    (dense_s, dense_cpu), (factored_s, factored_cpu) = load_s(dense_zoo, dense.ref), load_s(zoo, factored.ref)
    return {
        "change": f"{edits} edits (rank {edits}) on {matrices} x {shape[0]}x{shape[1]} float32",
        "dense_changed_bytes": changed_bytes,
        "dense_added_bytes": dense.added_bytes,
        "factored_added_bytes": factored.added_bytes,
        "factored_over_dense_bytes": round(factored.added_bytes / dense.added_bytes, 5),
        "dense_load_s": round(dense_s, 3),
        "factored_load_s": round(factored_s, 3),
        "factored_over_dense_load": round(factored_s / dense_s, 3),
        "dense_load_cpu_s": round(dense_cpu, 3),
        "factored_load_cpu_s": round(factored_cpu, 3),
        "parent_load_s": round(load_s(zoo, parent.ref)[0], 3),
        "load_average": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 6-layer, 512-wide model instead")
    parser.add_argument("--factored-only", action="store_true", help="only the factored-against-dense figures")
    args = parser.parse_args()
    n_layer, d = (6, 512) if args.quick else (24, 1024)
    work = Path(tempfile.mkdtemp(prefix="zoo-bench-"))
    try:
        if args.factored_only:
            print(json.dumps({"memit_gptj_mlp": factored_vs_dense(work),
                              "torch_threads": torch.get_num_threads()}, indent=2))
            return
        sd = gpt2_shaped_state_dict(n_layer, d)
        total = sum(t.nbytes for t in sd.values())
        source = work / "model"
        source.mkdir()
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": n_layer, "n_embd": d,
                  "n_head": 16, "vocab_size": 50257, "n_positions": 1024}
        (source / "config.json").write_text(json.dumps(config))
        baseline_s = timed(lambda: save_file(sd, source / "model.safetensors", metadata={"format": "pt"}))

        def save_and_fsync() -> None:
            save_file(sd, work / "fsynced.safetensors", metadata={"format": "pt"})
            fd = os.open(work / "fsynced.safetensors", os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)

        baseline_fsync_s = timed(save_and_fsync)
        zoo = modelzoo.open(work / "zoo")
        import_s = timed(lambda: zoo.import_(source, "bench"))
        export_s = timed(lambda: zoo.export("bench@1", work / "export"))

        # A child that changes about 1% of the parameters: the attention output projections of a few layers.
        names = [f"transformer.h.{i}.attn.c_proj.weight" for i in range(n_layer)]
        changed: dict[str, torch.Tensor] = {}
        for name in names:
            if sum(t.nbytes for t in changed.values()) >= 0.01 * total:
                break
            changed[name] = sd[name] + 1e-3
        changed_bytes = sum(t.nbytes for t in changed.values())
        before = disk_bytes(work / "zoo" / "blobs")
        child = zoo.commit("bench@1", changed, method="bench-edit")
        added_disk = disk_bytes(work / "zoo" / "blobs") - before

        mb = total / 1e6
        print(json.dumps({
            "model": f"gpt2-shaped n_layer={n_layer} d={d}",
            "tensors": len(sd),
            "model_mb": round(mb, 1),
            "save_file_mb_s": round(mb / baseline_s, 1),
            "save_file_fsync_mb_s": round(mb / baseline_fsync_s, 1),
            "import_mb_s": round(mb / import_s, 1),
            "export_mb_s": round(mb / export_s, 1),
            "import_vs_save_file": round(baseline_s / import_s, 3),
            "export_vs_save_file": round(baseline_s / export_s, 3),
            "import_vs_save_file_fsync": round(baseline_fsync_s / import_s, 3),
            "child_changed_fraction": round(changed_bytes / total, 4),
            "child_changed_bytes": changed_bytes,
            "child_added_disk_bytes": added_disk,
            "child_added_over_changed": round(added_disk / changed_bytes, 4),
            "child_added_bytes_recorded": child.added_bytes,
            "memit_gptj_mlp": factored_vs_dense(work),
            "torch_threads": torch.get_num_threads(),
        }, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
