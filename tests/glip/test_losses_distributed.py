"""The loss normalisers are global across DDP workers: one global batch split over 2 gloo processes (loopback)
gives the loss and the (DDP-averaged) gradients of 1 process on the whole batch, though its halves hold very
different numbers of positive anchors; with per-worker normalisers (the all-reduce left out) both differ."""
from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch

import glip.losses
import glip.model
from glip import GLIP

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = {"min_size": 96, "max_size": 96}
CAPTION = "a red ball and a blue box."
SPANS = [[[0, 10]], [[15, 25]]]
TERMS = ("loss", "loss_cls", "loss_box", "loss_centerness")


def global_batch() -> tuple[list[torch.Tensor], list[dict]]:
    """4 images of one size (so padding does not depend on the split) and one caption: the first two hold 4
    large boxes each, the last two one small box each (the halves' positive counts differ several-fold)."""
    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 96, 96, generator=generator) for _ in range(4)]
    many = {"boxes": torch.tensor([[2.0, 2, 60, 60], [30, 30, 94, 94], [0, 40, 70, 90], [40, 0, 95, 50]]),
            "tokens_positive": SPANS * 2}
    few = {"boxes": torch.tensor([[40.0, 40, 56, 58]]), "tokens_positive": SPANS[:1]}
    return images, [many, many, few, few]


def tiny_model() -> GLIP:
    """eval() switches dropout off (the ranks would draw other masks than one process); the loss path is the
    same as in training."""
    torch.manual_seed(0)
    return GLIP.from_preset("tiny", **SIZE).eval()


def losses_and_gradients(model, images, targets) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    losses = model(images, [CAPTION] * len(images), targets)
    losses["loss"].backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: losses[k].detach() for k in TERMS}, grads


def _ddp_worker(rank: int, world: int, port: int, out: str, model: GLIP) -> None:
    """One DDP rank, forked from the test with its copy of ``model``: forward/backward on its half of the batch."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ddp = DistributedDataParallel(model)
        images, targets = global_batch()
        half = len(images) // world
        mine = slice(rank * half, (rank + 1) * half)
        results = {}
        for variant in ("global", "per_worker"):
            if variant == "per_worker":   # what the loss was before: every worker its own normalisers
                glip.losses.workers_sharing_the_batch = lambda logits: 1
            losses, grads = losses_and_gradients(ddp, images[mine], targets[mine])
            terms = torch.stack([losses[k] for k in TERMS])
            dist.all_reduce(terms)        # as the training loop reports them: the mean over the workers
            results[variant] = {"terms": terms / world, "grads": {n.removeprefix("module."): g
                                                                 for n, g in grads.items()}}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _relative_error(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a - b| over every gradient, relative to the largest |b| (a tensor whose gradient is ~0 has only
    float32 noise of its own, 1e-7 of the largest)."""
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in b) / max(float(b[n].abs().max()) for n in b)


def test_two_workers_give_the_global_batch_loss_and_gradients(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    images, targets = global_batch()
    model = tiny_model()
    # fork, not spawn: the ranks start with this process's modules and weights (spawn: ~20 s more here)
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(tmp_path), model), nprocs=2, join=True,
                       start_method="fork")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    positives = []
    real = glip.model.grounding_losses

    def counting(*args, **kwargs):
        positives.append(sum(int((m.matched >= 0).sum()) for m in args[5]))
        return real(*args, **kwargs)

    monkeypatch.setattr(glip.model, "grounding_losses", counting)
    for half in (slice(0, 2), slice(2, 4)):
        with torch.no_grad():
            model(images[half], [CAPTION] * 2, targets[half])
    assert positives[0] >= 4 * positives[1] > 0, positives
    monkeypatch.undo()
    reference, reference_grads = losses_and_gradients(model, images, targets)

    want = torch.stack([reference[k] for k in TERMS])

    together = ranks[0]["global"]
    torch.testing.assert_close(together["terms"], want, rtol=1e-5, atol=1e-7)
    assert _relative_error(together["grads"], reference_grads) < 1e-5
    assert _relative_error(ranks[1]["global"]["grads"], together["grads"]) == 0    # DDP: the same on every rank

    apart = ranks[0]["per_worker"]          # the test can fail: per-worker normalisers are another objective
    assert not torch.allclose(apart["terms"][:3], want[:3], rtol=1e-2)
    assert _relative_error(apart["grads"], reference_grads) > 1e-2
