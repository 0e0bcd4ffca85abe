"""Same-run A/B of the float32 encoder levers: each one switched off and on, alternating, one process.

    python benchmarks/bench_encoder_levers.py [--archs vit_b tiny_vit lite_tiny_vit] [--pairs 4]
    python benchmarks/bench_encoder_levers.py --allocator [--pairs 2] [--where thread main]

Levers (all exact: the outputs are compared and printed):

* ``sdpa_attention``: ViT float32 attention through PyTorch's fused kernel with the relative-position
  terms as a mask (``vit.CPU_ATTENTION = "sdpa"``, the default) against the blocked kernel;
* ``window_chunks``: in the blocked kernel (switched on for this lever), ViT windowed attention in
  chunks of the window batch with whole rows (``vit._WINDOW_SCORES``) against a few rows of the
  whole batch;
* ``mbconv_strips``: TinyViT's first-stage inverted residuals in strips of image rows
  (``tiny_vit._MBCONV_ROWS``) against one pass over the whole maps;
* ``fused_gelu``: convolution/linear + GELU as one oneDNN call (``fused.ENABLED``);
* ``fused_linear``: the linear + GELU op alone, forced on against forced off (``fused.LINEAR``; by
  default it follows the CPU, see fused.py);
* ``--allocator``: the memory settings that cannot be undone inside a process, glibc's mmap/trim
  thresholds (``device.tune_allocator``) and PyTorch's transparent huge pages (requested when
  ``napari_medsam`` is imported): fresh subprocesses alternate, NAPARI_MEDSAM_MALLOC_TUNING=0
  and 1. ``--where thread`` runs the passes on a worker thread, as napari's workers do (glibc
  gives a thread its own arena, where blocks of 64 MB and more are always fresh memory maps);
  ``main`` on the main thread, as the command line does.

Per lever and network: the median time with the lever off and on, the median of the per-pair
ratios (off / on) and the largest difference of the embeddings. Random weights (speed does not
depend on the values); one 1024x1024 input (256x256 for LiteMedSAM). PyTorch's default
initialisation amplifies float rounding through TinyViT (differences up to ~1e-3 on embeddings of
~4 can come from nothing but which kernel oneDNN picks); exactness is what the golden tests check,
on the official checkpoints' scale. Prints figures, asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _encoder(arch: str):
    import torch

    from napari_medsam.models.networks.sam import build_network

    torch.manual_seed(0)
    net = build_network(arch).eval()
    size = int(net.image_size)
    return net.image_encoder, torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))


def _levers():
    from napari_medsam.models.networks import fused, tiny_vit, vit

    vits = ("vit_b", "vit_l", "vit_h")
    # name: (module, attribute, off, on, networks it applies to (None: all), settings held meanwhile)
    return {
        "sdpa_attention": (vit, "CPU_ATTENTION", "blocked", "sdpa", vits, {}),
        "window_chunks": (vit, "_WINDOW_SCORES", 1 << 60, vit._WINDOW_SCORES, vits,
                          {(vit, "CPU_ATTENTION"): "blocked"}),
        "fused_gelu": (fused, "ENABLED", False, True, None, {}),
        "fused_linear": (fused, "LINEAR", False, True, None, {}),
        "mbconv_strips": (tiny_vit, "_MBCONV_ROWS", None, tiny_vit._MBCONV_ROWS, ("tiny_vit", "lite_tiny_vit"), {}),
    }


def ab_lever(name: str, arch: str, pairs: int) -> dict:
    """Time ``arch``'s encoder with lever ``name`` off and on, alternating; restore it afterwards."""
    import torch

    module, attr, off, on, archs, held = _levers()[name]
    restore = getattr(module, attr)
    restore_held = {key: getattr(*key) for key in held}
    encoder, image = _encoder(arch)
    times: dict[str, list[float]] = {"off": [], "on": []}
    try:
        for (held_module, held_attr), value in held.items():
            setattr(held_module, held_attr, value)
        with torch.inference_mode():
            outputs = {}
            encoder(image)  # a process's first pass may pick other kernels: not the one compared
            for state, value in (("off", off), ("on", on)):  # warm-up and the outputs to compare
                setattr(module, attr, value)
                outputs[state] = encoder(image)
            for i in range(pairs):
                order = (("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))
                for state, value in order:
                    setattr(module, attr, value)
                    start = time.perf_counter()
                    encoder(image)
                    times[state].append(time.perf_counter() - start)
    finally:
        setattr(module, attr, restore)
        for (held_module, held_attr), value in restore_held.items():
            setattr(held_module, held_attr, value)
    ratios = [a / b for a, b in zip(times["off"], times["on"])]
    return {"lever": name, "arch": arch, "off_s": statistics.median(times["off"]),
            "on_s": statistics.median(times["on"]), "ratio": statistics.median(ratios),
            "max_abs_diff": float((outputs["off"] - outputs["on"]).abs().max())}


def _allocator_child(arch: str, runs: int, where: str) -> None:
    import napari_medsam  # noqa: F401  (first, as in the plugin: it requests huge pages before torch allocates)

    import resource
    import threading

    import torch

    from napari_medsam.models.device import tune_allocator

    encoder, image = _encoder(arch)
    applied = tune_allocator()  # as SamModel does: after torch and the network are loaded
    result: dict = {}

    def passes() -> None:
        with torch.inference_mode():
            encoder(image)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            times = []
            for _ in range(runs):
                start = time.perf_counter()
                encoder(image)
                times.append(time.perf_counter() - start)
            result.update(s=statistics.median(times),
                          faults=(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // runs)

    if where == "thread":
        worker = threading.Thread(target=passes)
        worker.start()
        worker.join()
    else:
        passes()
    print(json.dumps({"applied": applied, "huge_pages": os.environ.get("THP_MEM_ALLOC_ENABLE") == "1", **result,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def ab_allocator(arch: str, pairs: int, runs: int = 2, where: str = "thread") -> dict:
    """Fresh subprocesses, tuning off and on alternately: median times, page faults per pass, peak memory."""
    out: dict[str, list[dict]] = {"0": [], "1": []}
    for i in range(pairs):
        for value in ("0", "1") if i % 2 == 0 else ("1", "0"):
            env = dict(os.environ, NAPARI_MEDSAM_MALLOC_TUNING=value)
            env.pop("THP_MEM_ALLOC_ENABLE", None)  # set by this process's own import of napari_medsam
            done = subprocess.run([sys.executable, __file__, "--allocator-child", arch, "--runs", str(runs),
                                   "--where", where], env=env, capture_output=True, text=True, check=True)
            out[value].append(json.loads(done.stdout.strip().splitlines()[-1]))
    ratios = [a["s"] / b["s"] for a, b in zip(out["0"], out["1"])]
    return {"lever": f"allocator ({where})", "arch": arch, "off_s": statistics.median(r["s"] for r in out["0"]),
            "on_s": statistics.median(r["s"] for r in out["1"]), "ratio": statistics.median(ratios),
            "faults_off": statistics.median(r["faults"] for r in out["0"]),
            "faults_on": statistics.median(r["faults"] for r in out["1"]),
            "peak_mib_off": max(r["peak_mib"] for r in out["0"]), "peak_mib_on": max(r["peak_mib"] for r in out["1"]),
            "applied": all(r["applied"] and r["huge_pages"] for r in out["1"])
            and not any(r["applied"] or r["huge_pages"] for r in out["0"])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["vit_b", "tiny_vit", "lite_tiny_vit"])
    parser.add_argument("--levers", nargs="+",
                        default=["sdpa_attention", "window_chunks", "mbconv_strips", "fused_gelu", "fused_linear"])
    parser.add_argument("--pairs", type=int, default=4)
    parser.add_argument("--allocator", action="store_true", help="only the allocator lever (subprocesses)")
    parser.add_argument("--allocator-child", metavar="ARCH", help=argparse.SUPPRESS)
    parser.add_argument("--where", nargs="+", choices=("thread", "main"), default=["thread", "main"],
                        help="allocator lever: encoder passes on a worker thread (napari) and/or the main thread (CLI)")
    parser.add_argument("--runs", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.allocator_child:
        _allocator_child(args.allocator_child, args.runs, args.where[0])
        return 0
    import torch

    print(f"# bench_encoder_levers: torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for arch in args.archs:
        if args.allocator:
            rows.extend(ab_allocator(arch, args.pairs, where=where) for where in args.where)
            continue
        for name in args.levers:
            archs = _levers()[name][4]
            if archs is None or arch in archs:
                rows.append(ab_lever(name, arch, args.pairs))
    print("| lever | network | off (median) | on (median) | off / on (median of pairs) | largest difference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        extra = (f"faults per pass {r['faults_off']:.0f} -> {r['faults_on']:.0f}, peak {r['peak_mib_off']:.0f} -> "
                 f"{r['peak_mib_on']:.0f} MiB" if r["lever"].startswith("allocator") else f"{r['max_abs_diff']:.1e}")
        print(f"| {r['lever']} | {r['arch']} | {r['off_s']:.3f} s | {r['on_s']:.3f} s | {r['ratio']:.3f} | {extra} |")
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
