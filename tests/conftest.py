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
