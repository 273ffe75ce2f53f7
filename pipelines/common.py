"""Small helpers every command shares: user errors, logging, Ray start-up."""
from __future__ import annotations

import logging
import os

import typer
from rich.console import Console

from storage.errors import InputError

console = Console(stderr=True)


def fail(message: str) -> "typer.Exit":
    """Print a user error and return the exit to raise (exit code 2)."""
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code=2)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join ``address`` (or RAY_ADDRESS) or start a local Ray; reuse one already running.

    The storage environment of this process (``storage.fs.worker_environment``: AWS endpoint,
    credentials, region) goes to every worker of the job, so a task on any node resolves
    ``s3://`` paths exactly as the driver does. Returns True when this call started Ray
    (the caller may shut it down).
    """
    import ray

    from storage.fs import worker_environment

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs = {"address": address} if address else {"num_cpus": num_cpus}
    env = worker_environment()
    if env:
        kwargs["runtime_env"] = {"env_vars": env}
    ray.init(log_to_driver=False, include_dashboard=False, configure_logging=False,
             ignore_reinit_error=True, **kwargs)
    return True


def not_implemented(name: str) -> None:
    raise fail(f"`glipctl {name}` is not implemented yet")


__all__ = ["InputError", "console", "ensure_ray", "fail", "not_implemented", "setup_logging"]
