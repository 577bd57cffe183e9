"""Shared fixtures: tiny components built once per session, and an offline hub for every test."""

import os

# Before anything imports huggingface_hub: no test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DREAMBOOTH_MODE", "tiny")

import pytest  # noqa: E402

from dreambooth_lib.models import Components, tiny_components  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sd() -> Components:
    return tiny_components("sd")


@pytest.fixture(scope="session")
def tiny_sdxl() -> Components:
    return tiny_components("sdxl")


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory, tiny_sd):
    """The tiny SD model saved as a diffusers pipeline folder (what a full-mode user would have on disk)."""
    from dreambooth_lib.models import save_components

    return save_components(tiny_sd, tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sdxl_folder(tmp_path_factory, tiny_sdxl):
    from dreambooth_lib.models import save_components

    return save_components(tiny_sdxl, tmp_path_factory.mktemp("tiny-sdxl"))


# --------------------------------------------------------------------------------------------------------------------
# Process-wide state a test changes and must give back (issue 22).


@pytest.fixture
def matplotlib_backend():
    """Lets a test switch matplotlib's backend; the one before it is restored afterwards, pass or fail."""
    import matplotlib

    before = matplotlib.get_backend()
    yield matplotlib
    matplotlib.use(before)
