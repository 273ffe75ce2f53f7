"""Model throughput: tiny forward+backward at 320 px (CPU), glip-t forward at 800x1333 (CPU), and glip-t forward in
fp32/bf16 at batch 1 and 8 on a GPU when one is present. Random weights: speed does not depend on their values.

Run alone: ``python -m benchmarks.run model`` (``GLIPCTL_BENCH_QUICK=1`` for fewer iterations).
"""
from __future__ import annotations

import os
import time

# Baselines beside the numbers: the first measurement on this machine (torchvision's deform_conv2d in tiny, whose
# CPU backward took 64% of a step), and the official GLIP-T on CPU (official_glip README: ~20 s per 800x1066 image).
BASELINE_TINY_CPU = "0.20 img/s with torchvision deform_conv2d (first run, loaded 2-core machine)"
BASELINE_GLIP_T_CPU = "official GLIP-T on CPU: ~0.05 img/s (~20 s per 800x1066 image, official_glip README)"
BASELINE_GLIP_T_GPU = "no earlier GPU measurement in this project"


def _timed(fn, iterations: int) -> float:
    """Seconds per call, after one warm-up call."""
    fn()
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


def bench_tiny_train(iterations: int) -> float:
    import torch

    from glip import GLIP

    torch.manual_seed(0)
    model = GLIP.from_preset("tiny").train()
    images = [torch.rand(3, 320, 320), torch.rand(3, 320, 320)]
    captions = ["a dog chasing a red ball on the grass.", "two people riding bicycles down a street"]
    targets = [{"boxes": torch.tensor([[20.0, 30, 180, 200], [200, 220, 260, 280]]),
                "tokens_positive": [[[0, 5]], [[16, 26]]]},
               {"boxes": torch.tensor([[40.0, 50, 300, 310]]), "tokens_positive": [[[0, 10]]]}]

    def step():
        model.zero_grad(set_to_none=True)
        model(images, captions, targets)["loss"].backward()

    return len(images) / _timed(step, iterations)


def bench_glip_t_forward(iterations: int, device: str = "cpu", dtype=None, batch: int = 1) -> float:
    import torch

    from glip import GLIP

    model = GLIP.from_preset("glip-t", text_pretrained=False).to(device).eval()
    images = [torch.rand(3, 800, 1333, device=device) for _ in range(batch)]
    captions = ["person. bicycle. car. motorcycle. dog. cat. a red ball and a blue box."] * batch

    def forward():
        with torch.inference_mode(), torch.autocast(device_type=device, dtype=dtype, enabled=dtype is not None):
            model(images, captions)
        if device == "cuda":
            torch.cuda.synchronize()

    return batch / _timed(forward, iterations)


def run(quick: bool) -> str:
    import torch

    torch.manual_seed(0)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    threads = torch.get_num_threads()
    tiny = bench_tiny_train(3 if quick else 10)
    torch.set_num_threads(1)   # on a shared machine one thread often beats two (no oversubscription)
    tiny_one_thread = bench_tiny_train(3 if quick else 10)
    torch.set_num_threads(threads)
    glip_t = bench_glip_t_forward(1 if quick else 2)
    lines = [
        "## Model (glip/)",
        "",
        f"CPU, {threads} torch threads, load average {load:.1f} at start (other jobs running make these noisy).",
        "",
        "| measurement | images/s | baseline |",
        "|---|---|---|",
        f"| tiny forward+backward, 2 images 320x320, {threads} threads | {tiny:.2f} | {BASELINE_TINY_CPU} |",
        f"| tiny forward+backward, 2 images 320x320, 1 thread | {tiny_one_thread:.2f} | {BASELINE_TINY_CPU} |",
        f"| glip-t forward, 1 image 800x1333, {threads} threads | {glip_t:.3f} | {BASELINE_GLIP_T_CPU} |",
    ]
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        for dtype, label in ((None, "fp32"), (torch.bfloat16, "bf16")):
            for batch in (1, 8):
                speed = bench_glip_t_forward(3 if quick else 10, "cuda", dtype, batch)
                lines.append(f"| glip-t forward {label}, batch {batch}, 800x1333 ({name}) | {speed:.2f} "
                             f"| {BASELINE_GLIP_T_GPU} |")
    else:
        lines += ["", "No GPU in this run: the glip-t fp32/bf16 batch 1/8 rows appear when CUDA is available."]
    return "\n".join(lines) + "\n"
