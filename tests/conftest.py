"""Shared fixtures: tiny components built once per session, and an offline hub for every test."""

import os

# Before anything imports huggingface_hub: no test may reach a model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DREAMBOOTH_MODE", "tiny")
# The test command runs two processes (pytest-xdist) on CI's two cores: one thread each, inherited by the notebooks'
# kernels. Two threads each would oversubscribe the cores, and OpenMP threads waiting on a busy core slow torch down
# many times over (seen under load: notebook 02's one-minute training cell ran past its 300-s timeout).
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

from dreambooth_lib.models import Components, tiny_components  # noqa: E402


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from a second thread, and on a shared machine its waits cost seconds per step."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


# --- issue 21: the stand-in hub cache (scripts/standin_hub.py), the course's real hub ids with tiny random weights ---


def _standin_hub_module():
    """scripts/ is not a package: load the script by path, as the rehearsal runs it."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "standin_hub.py"
    spec = importlib.util.spec_from_file_location("standin_hub", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def standin_hub():
    """The stand-in hub script as a module (write_standin_hub, WRITERS, commit_hash)."""
    return _standin_hub_module()


@pytest.fixture(scope="session")
def standin_hub_cache(tmp_path_factory, standin_hub):
    """A hub cache holding every repository the course loads, tiny, written once per session; never modify it."""
    return standin_hub.write_standin_hub(tmp_path_factory.mktemp("standin-hub"))


@pytest.fixture
def offline_hub(monkeypatch):
    """Point huggingface_hub (read at call time by diffusers and transformers) at a cache folder, offline."""

    def use(cache):
        import huggingface_hub.constants

        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
        return cache

    return use


# --------------------------------------------------------------------------------------------------------------------
# Process-wide state a test changes and must give back (issue 22).


@pytest.fixture
def matplotlib_backend():
    """Lets a test switch matplotlib's backend; the one before it is restored afterwards, pass or fail."""
    import matplotlib

    before = matplotlib.get_backend()
    yield matplotlib
    matplotlib.use(before)
