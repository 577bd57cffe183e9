"""Where the sample data lives: the CLIP tokenizer, the sample subjects and scene frames, the evaluation prompts.

The files have one home, the repository's top-level `data/` folder. A wheel (`pip install .`, or Colab's
`pip install git+...`) carries that folder inside the package as `dreambooth_lib/sample_data/` (pyproject.toml maps it),
so a notebook running in an empty folder finds the same files offline as a source checkout does.
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_dir() -> Path:
    """The sample-data folder: inside the installed package, or the checkout's `data/` for an editable install."""
    installed = _PACKAGE / "sample_data"  # where a wheel puts data/
    if installed.is_dir():
        return installed
    checkout = _PACKAGE.parent / "data"
    if checkout.is_dir():
        return checkout
    raise FileNotFoundError(
        f"the sample data is missing: neither {installed} nor {checkout} exists. Reinstall the package "
        f'(pip install --force-reinstall "dreambooth-course @ ...") rather than copying dreambooth_lib/ alone.'
    )


def data_path(*parts: str) -> Path:
    """A path inside the sample data, e.g. `data_path("subjects", "dog")`; raises if it does not exist."""
    path = data_dir().joinpath(*parts)
    if not path.exists():
        available = sorted(p.name for p in path.parent.iterdir()) if path.parent.is_dir() else []
        hint = f" (there: {', '.join(available)})" if available else ""
        raise FileNotFoundError(f"no sample data at {path}{hint}")
    return path
