"""Class images for prior preservation: only the missing ones are made, a restart resumes, files are never partial."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dreambooth_lib import priors
from dreambooth_lib.images import DataError, check_folder
from dreambooth_lib.models import build_pipeline

PROMPT = "a photo of a dog"
STEPS = 2


@pytest.fixture(scope="module")
def pipeline(tiny_sd):
    return build_pipeline(tiny_sd)


@pytest.fixture
def generate_calls(monkeypatch):
    """Record the number of images each call to `generate` is asked for (the real sampler still runs)."""
    calls: list[int] = []
    real = priors.generate

    def counting(*args, **kwargs):
        calls.append(kwargs["num_images"])
        return real(*args, **kwargs)

    monkeypatch.setattr(priors, "generate", counting)
    return calls


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def _make(pipeline, folder, count, batch_size=2):
    return priors.generate_class_images(
        pipeline, folder, PROMPT, count, batch_size=batch_size, num_inference_steps=STEPS, seed=7, progress=False
    )


def test_existing_images_count_and_only_the_missing_are_generated(pipeline, tmp_path, generate_calls):
    for name in ("mine-a.jpg", "mine-b.png"):
        Image.new("RGB", (64, 64), "gray").save(tmp_path / name)
    images = _make(pipeline, tmp_path, 5)
    assert sum(generate_calls) == 3  # 5 asked, 2 already there
    assert generate_calls == [2, 1]  # batched by batch_size
    new = sorted(p.name for p in tmp_path.glob("class-*.png"))
    assert new == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert len(images) == 5
    record = json.loads((tmp_path / "class-00002.json").read_text())
    # The tiny model samples at its native 64 px; no model name was given to record.
    assert record == {
        "file": "class-00002.png", "prompt": PROMPT, "model": None, "resolution": 64, "seed": 7 + 2, "steps": STEPS
    }  # fmt: skip
    # The dataset checks read the same folder: all 5 images usable, the JSON sidecars skipped.
    assert len(check_folder(tmp_path, progress=False).usable) == 5
    generate_calls.clear()
    assert len(_make(pipeline, tmp_path, 5)) == 5
    assert generate_calls == []  # nothing missing, nothing generated


def test_interrupted_run_resumes_to_the_images_of_an_uninterrupted_run(pipeline, tmp_path, monkeypatch):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    _make(pipeline, whole, 5)

    real, calls = priors.generate, []

    def dies_on_second_batch(*args, **kwargs):
        calls.append(kwargs["num_images"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # what a Colab disconnect or Ctrl-C looks like to the loop
        return real(*args, **kwargs)

    monkeypatch.setattr(priors, "generate", dies_on_second_batch)
    with pytest.raises(KeyboardInterrupt):
        _make(pipeline, resumed, 5)
    assert len(priors.existing_class_images(resumed)) == 2  # the first batch was written as it came
    monkeypatch.setattr(priors, "generate", real)
    _make(pipeline, resumed, 5)
    names = sorted(p.name for p in whole.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir())
    assert len(names) == 10  # 5 images + 5 sidecars
    for name in names:
        assert (whole / name).read_bytes() == (resumed / name).read_bytes(), name


def test_a_smaller_first_target_grows_into_the_same_images(pipeline, tmp_path):
    whole, grown = tmp_path / "whole", tmp_path / "grown"
    _make(pipeline, whole, 4)
    _make(pipeline, grown, 1)
    _make(pipeline, grown, 4)
    for index in range(4):
        name = priors.class_image_name(index)
        # Same seeds, but images 0 and 1 were sampled in batches of another size: CPU matmuls may then round one
        # pixel differently, never more than one grey level.
        difference = np.abs(_pixels(whole / name) - _pixels(grown / name))
        assert difference.max() <= 1 and difference.mean() < 0.01, name
        assert (whole / name).with_suffix(".json").read_text() == (grown / name).with_suffix(".json").read_text()


def test_a_stale_temporary_file_is_not_counted(pipeline, tmp_path, generate_calls):
    crashed = subprocess.Popen([sys.executable, "-c", "pass"])
    crashed.wait()  # a writer that died mid-write: its pid runs no more
    Image.new("RGB", (64, 64)).save(tmp_path / "class-00000.png")  # made earlier, with its sidecar
    (tmp_path / "class-00000.json").write_text(json.dumps({"prompt": PROMPT}))
    stale = tmp_path / f".class-00001.png.tmp-{crashed.pid}-0123abcd"
    stale.write_bytes(b"\x89PNG half written")
    images = _make(pipeline, tmp_path, 2)
    assert generate_calls == [1]
    assert [p.name for p in images] == ["class-00000.png", "class-00001.png"]
    assert not stale.exists()  # cleared, and never counted
    Image.open(tmp_path / "class-00001.png").verify()


def test_class_images_of_another_prompt_model_or_size_are_never_reused(pipeline, tmp_path, generate_calls):
    settings = dict(num_inference_steps=STEPS, model="tiny", resolution=64, progress=False)
    priors.generate_class_images(pipeline, tmp_path, PROMPT, 2, **settings)
    Image.new("RGB", (64, 64)).save(tmp_path / "my-own-cat.png")  # the user's own images are theirs to choose
    priors.check_class_images(tmp_path, prompt=PROMPT, model="tiny", resolution=64)
    generate_calls.clear()
    for change, shown in (
        ({"prompt": "a photo of a cat"}, "prompt 'a photo of a dog'"),
        ({"model": "other/model"}, "model 'tiny'"),
        ({"resolution": 128}, "resolution 64"),
    ):
        wanted = {"prompt": PROMPT, "model": "tiny", "resolution": 64, **change}
        with pytest.raises(DataError, match=rf"class_dir {tmp_path} .*{shown}.*another folder"):
            priors.check_class_images(tmp_path, **wanted)
    with pytest.raises(DataError, match="a photo of a cat"):
        priors.generate_class_images(pipeline, tmp_path, "a photo of a cat", 4, **{**settings, "model": "tiny"})
    assert generate_calls == []


def test_bad_class_image_settings_are_refused(pipeline, tmp_path):
    with pytest.raises(ValueError, match="class_prompt"):
        priors.generate_class_images(pipeline, tmp_path, " ", 2)
    with pytest.raises(ValueError, match="batch_size=0"):
        priors.generate_class_images(pipeline, tmp_path, PROMPT, 2, batch_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        priors.generate_class_images(pipeline, tmp_path / "file", PROMPT, 2)
