"""Shared test set-up: a private cache directory and a fixed thread count."""

import os

import pytest
import torch

torch.set_num_threads(min(2, os.cpu_count() or 1))
torch.set_flush_denormal(True)  # as the vitlab command does: denormals make untrained CNNs crawl


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    # Rendered data sets go to a throw-away cache, never to the user's ~/.cache.
    os.environ["VITLAB_CACHE"] = str(tmp_path_factory.mktemp("vitlab-cache"))
    yield


@pytest.fixture
def cli(capsys):
    """``vitlab ARGS`` in this process: ``cli(*args) -> (exit code, stdout, stderr)`` of that call alone.

    Faster than a subprocess (no second import of torch); argparse's own errors (SystemExit) give
    their exit code. The console script itself is tested in test_cli.py.
    """
    from vitlab.cli import main

    def run(*args) -> tuple[int, str, str]:
        capsys.readouterr()  # what earlier calls printed is not this call's
        try:
            code = main([str(a) for a in args])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
