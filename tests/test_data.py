"""The instance/class dataset: awkward files loaded correctly or refused by name, transforms, collate, latent cache."""

import io
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from dreambooth_lib.cli import main
from dreambooth_lib.data import (
    DreamBoothDataset,
    LatentCache,
    collate_examples,
    encode_latents,
    latent_moments,
    sample_latents,
)
from dreambooth_lib.images import DataError, check_folder, load_image, resize_shorter_side

SUBJECTS = Path(__file__).resolve().parent.parent / "data" / "subjects"
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _png_rgb16(path: Path, rgb16: tuple[int, int, int], size: int = 8) -> None:
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot save one)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" + np.array([rgb16] * size, dtype=">u2").tobytes()
    header = struct.pack(">IIBBBBB", size, size, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row * size)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def _halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    image = Image.new(mode, size, left)
    image.paste(Image.new(mode, (size[0] // 2, size[1]), right), (size[0] // 2, 0))
    return image


def _noise_jpeg(seed: int = 0, size: int = 96) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def awkward(tmp_path_factory) -> Path:
    """A folder with one file of every kind a user's photo folder may hold."""
    folder = tmp_path_factory.mktemp("awkward")
    Image.new("RGB", (64, 64), (200, 10, 30)).save(folder / "rgb.png")
    Image.new("L", (64, 64), 77).save(folder / "gray.png")
    _halves((64, 64), (0, 0), (50, 255), mode="LA").save(folder / "gray_alpha.png")  # left transparent
    _halves((64, 64), (255, 0, 0, 0), (0, 0, 255, 255), mode="RGBA").save(folder / "rgba.png")  # left transparent
    palette = _halves((64, 64), 0, 1, mode="P")
    palette.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    palette.save(folder / "palette.png", transparency=0)  # index 0 (black) transparent
    Image.new("CMYK", (64, 64), (255, 0, 0, 0)).save(folder / "cmyk.jpg", quality=100)  # pure cyan
    Image.fromarray(np.full((64, 64), 128 * 257, np.uint16)).save(folder / "gray16.png")
    _png_rgb16(folder / "rgb16.png", (65535, 128 * 257, 0), size=64)
    Image.fromarray(np.full((64, 64), 128 * 257, np.int32)).save(folder / "int32.tif")
    Image.fromarray(np.full((64, 64), 0.25, np.float32)).save(folder / "float.tif")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    _halves((128, 64), RED, BLUE).save(folder / "rotated.jpg", exif=exif, quality=95)
    frames = [Image.new("RGB", (64, 64), colour) for colour in (GREEN, RED)]
    frames[0].save(folder / "two_frames.gif", save_all=True, append_images=frames[1:])
    frames[0].save(folder / "camera.mpo", save_all=True, append_images=frames[1:], quality=95)
    Image.new("RGB", (16, 16), BLUE).save(folder / "tiny.png")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(range(200)))
    (folder / "rgb.txt").write_text("a photo of sks dog")
    (folder / "metadata.jsonl").write_text('{"file": "rgb.png", "seed": 0}\n')
    (folder / "gray.json").write_text('{"prompt": "a dog"}')
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(_noise_jpeg()[:3000])
    (folder / "not_an_image.jpg").write_text("<html>404 not found</html>")
    return folder


def _pixel(path: Path, xy: tuple[int, int]) -> tuple[int, ...]:
    return load_image(path).getpixel(xy)


@pytest.mark.parametrize(
    ("name", "xy", "expected", "tolerance"),
    [
        ("rgb.png", (5, 5), (200, 10, 30), 0),
        ("gray.png", (5, 5), (77, 77, 77), 0),
        ("gray_alpha.png", (5, 5), WHITE, 0),
        ("gray_alpha.png", (60, 5), (50, 50, 50), 0),
        ("rgba.png", (5, 5), WHITE, 0),  # a transparent red pixel becomes white, not red or black
        ("rgba.png", (60, 5), BLUE, 0),
        ("palette.png", (5, 5), WHITE, 0),
        ("palette.png", (60, 5), GREEN, 0),
        ("cmyk.jpg", (5, 5), (0, 255, 255), 3),
        ("gray16.png", (5, 5), (128, 128, 128), 0),  # scaled by 1/257, not clipped to 255
        ("rgb16.png", (5, 5), (255, 128, 0), 0),
        ("int32.tif", (5, 5), (128, 128, 128), 0),
        ("float.tif", (5, 5), (64, 64, 64), 0),  # float in [0, 1] -> 0.25 * 255
        ("two_frames.gif", (5, 5), GREEN, 0),  # first frame, not the last
        ("camera.mpo", (5, 5), GREEN, 3),
    ],
)
def test_every_mode_loads_as_the_right_rgb_colour(awkward, name, xy, expected, tolerance):
    image = load_image(awkward / name)
    assert image.mode == "RGB" and image.size == (64, 64)
    assert np.abs(np.subtract(image.getpixel(xy), expected)).max() <= tolerance


def test_exif_orientation_is_applied_to_the_pixels(awkward):
    image = load_image(awkward / "rotated.jpg")
    assert image.size == (64, 128)  # stored 128x64 landscape, displayed portrait
    # Rotating clockwise brings the stored left (red) half to the top and the right (blue) half to the bottom.
    assert np.abs(np.subtract(image.getpixel((32, 20)), RED)).max() < 10
    assert np.abs(np.subtract(image.getpixel((32, 108)), BLUE)).max() < 10


def test_check_folder_gives_each_file_its_verdict(awkward):
    report = check_folder(awkward, resolution=64, progress=False)
    verdicts = {row.file.name: row.verdict for row in report.rows}
    assert {name for name, verdict in verdicts.items() if verdict == "skipped"} == {
        ".DS_Store",
        "rgb.txt",
        "metadata.jsonl",
        "gray.json",
    }
    assert {name for name, verdict in verdicts.items() if verdict == "refused"} == {
        "empty.jpg",
        "truncated.jpg",
        "not_an_image.jpg",
    }
    assert {name for name, verdict in verdicts.items() if verdict == "warning"} == {"tiny.png"}
    assert len(report.usable) == 14 and not report.ok
    notes = {row.file.name: row.note for row in report.rows}
    assert "0 bytes" in notes["empty.jpg"]
    assert "truncated" in notes["truncated.jpg"]
    assert "not an image" in notes["not_an_image.jpg"]
    assert "upscaled" in notes["tiny.png"]
    assert "EXIF orientation applied" in notes["rotated.jpg"]
    assert "first of 2 frames" in notes["two_frames.gif"]
    sizes = {row.file.name: row.size for row in report.rows}
    modes = {row.file.name: row.mode for row in report.rows}
    assert sizes["rotated.jpg"] == (64, 128) and modes["cmyk.jpg"] == "CMYK" and modes["gray16.png"] == "I;16"


def test_refusal_names_every_bad_file_and_the_fix(awkward):
    with pytest.raises(DataError) as raised:
        check_folder(awkward, progress=False).raise_for_problems()
    message = str(raised.value)
    for name, fix in [("empty.jpg", "copy it again"), ("truncated.jpg", "re-export"), ("not_an_image.jpg", "JPEG")]:
        line = next(line for line in message.splitlines() if name in line)
        assert fix in line
    with pytest.raises(DataError, match="truncated.jpg"):
        load_image(awkward / "truncated.jpg")


def test_a_corrupt_png_checksum_is_refused(tmp_path):
    Image.new("RGB", (32, 32), RED).save(tmp_path / "good.png")
    data = bytearray((tmp_path / "good.png").read_bytes())
    idat = data.index(b"IDAT")
    data[idat + 6] ^= 0xFF  # flip a byte of compressed pixel data: the chunk's CRC no longer matches
    (tmp_path / "bad.png").write_bytes(bytes(data))
    report = check_folder(tmp_path, progress=False)
    assert [row.file.name for row in report.refused] == ["bad.png"] and report.usable == [tmp_path / "good.png"]


def test_missing_empty_and_sidecar_only_folders_are_refused(tmp_path):
    assert "does not exist" in check_folder(tmp_path / "nowhere").problems()[0]
    (tmp_path / "only_captions").mkdir()
    (tmp_path / "only_captions" / "a.txt").write_text("caption")
    report = check_folder(tmp_path / "only_captions", progress=False)
    assert not report.ok and "holds no images (found: a.txt)" in report.problems()[0]
    with pytest.raises(DataError, match="holds no images"):
        DreamBoothDataset(tmp_path / "only_captions", "a photo of sks dog", resolution=64)


def test_dataset_refuses_a_bad_class_folder_naming_each_file(awkward):
    with pytest.raises(DataError, match=r"(?s)^class folder: .*empty\.jpg.*not_an_image\.jpg.*truncated\.jpg"):
        DreamBoothDataset(SUBJECTS / "dog", "a sks dog", 64, class_dir=awkward, class_prompt="a dog")


@pytest.mark.parametrize(("folder", "code"), [(SUBJECTS / "dog", 0), (SUBJECTS / "teapot", 0), ("awkward", 1)])
def test_check_data_command_exit_code(awkward, capsys, folder, code):
    folder = awkward if folder == "awkward" else folder
    assert main(["check-data", str(folder), "--resolution", "512"]) == code
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["file", "size", "mode", "verdict"]
    if code:
        assert "truncated.jpg" in out and "refused" in out and "NOT usable" in out
    else:
        assert "00.jpg  512x512  RGB   ok" in out and "5 usable image(s), 0 refused -> usable" in out


def test_check_progress_counts_images_not_their_sidecars(tmp_path, capsys):
    for index in range(2):
        Image.new("RGB", (8, 8), RED).save(tmp_path / f"{index:04d}.png")
        (tmp_path / f"{index:04d}.json").write_text("{}")
    report = check_folder(tmp_path, progress=True)
    assert len(report.usable) == 2
    progress = capsys.readouterr().err
    assert "0/2" in progress and "/4" not in progress


def test_training_decodes_each_image_once(folders, monkeypatch):
    """The check keeps what it decoded; the dataset (and its latent cache) never opens the files again."""
    import dreambooth_lib.images as images

    opened = []
    real_open = images._open
    monkeypatch.setattr(images, "_open", lambda path: opened.append(path.name) or real_open(path))
    instance, classes = folders
    report = check_folder(instance, 64, progress=False, keep_images=True)
    dataset = DreamBoothDataset(report, "sks", 64, class_dir=classes, class_prompt="dog")
    for index in range(len(dataset)):
        dataset[index]
    names = sorted(path.name for path in [*instance.iterdir(), *classes.glob("*.png")])
    assert sorted(opened) == names  # each image once: the instance check, then the class folder's check


# --------------------------------------------------------------------------------------------------------------------
# Transforms and the dataset


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    """Three instance images (wide, tall, square) and two class images with the sidecars class generation writes."""
    root = tmp_path_factory.mktemp("subject")
    instance, classes = root / "instance", root / "class"
    instance.mkdir()
    classes.mkdir()
    # Wide: red | green | blue thirds of a 192x64 image, so the centre crop at 64 px is all green.
    wide = Image.new("RGB", (192, 64), RED)
    wide.paste(Image.new("RGB", (64, 64), GREEN), (64, 0))
    wide.paste(Image.new("RGB", (64, 64), BLUE), (128, 0))
    wide.save(instance / "a_wide.png")
    _halves((100, 200), RED, BLUE).save(instance / "b_tall.png")
    _halves((128, 128), WHITE, (0, 0, 0)).save(instance / "c_square.png")
    for index, colour in enumerate((GREEN, BLUE)):
        Image.new("RGB", (80, 80), colour).save(classes / f"{index:04d}.png")
        (classes / f"{index:04d}.json").write_text('{"prompt": "a photo of a dog", "seed": 0}')
    (classes / "metadata.jsonl").write_text('{"file": "0000.png"}\n')
    return instance, classes


def test_resize_makes_the_shorter_side_the_resolution():
    assert resize_shorter_side(Image.new("RGB", (200, 100)), 64).size == (128, 64)
    assert resize_shorter_side(Image.new("RGB", (30, 45)), 64).size == (64, 96)


def test_dataset_warns_about_images_smaller_than_the_resolution(tmp_path):
    Image.new("RGB", (16, 24), RED).save(tmp_path / "small.png")
    with pytest.warns(UserWarning, match=r"small\.png \(16x24\)"):
        dataset = DreamBoothDataset(tmp_path, "sks", 64)
    assert dataset[0]["instance_pixels"].shape == (3, 64, 64)


def test_dataset_items_are_centre_cropped_tensors_in_minus_one_to_one(folders):
    instance, classes = folders
    dataset = DreamBoothDataset(instance, "a photo of sks dog", 64, class_dir=classes, class_prompt="a photo of a dog")
    assert len(dataset) == 3 and dataset.with_prior
    assert [path.name for path in dataset.class_images] == ["0000.png", "0001.png"]  # sidecars skipped
    item = dataset[0]
    assert item["instance_pixels"].shape == item["class_pixels"].shape == (3, 64, 64)
    assert item["instance_pixels"].dtype == torch.float32
    # The wide image's centre third is pure green: (0, 255, 0) -> (-1, 1, -1).
    torch.testing.assert_close(item["instance_pixels"][:, 32, 32], torch.tensor([-1.0, 1.0, -1.0]))
    assert item["instance_prompt"] == "a photo of sks dog" and item["class_prompt"] == "a photo of a dog"
    square = dataset[2]["instance_pixels"]
    assert square.min() == -1.0 and square.max() == 1.0
    # Example i pairs class image i mod 2: example 2 wraps round to the first (green), example 1 is the second (blue).
    assert dataset[2]["class_pixels"][1].mean() == 1.0 and dataset[1]["class_pixels"][2].mean() == 1.0


def test_random_flip_mirrors_about_half_the_items(folders):
    instance, _ = folders
    dataset = DreamBoothDataset(instance, "sks", 64, random_flip=True)
    torch.manual_seed(0)
    flipped = [bool(dataset[2]["instance_pixels"][0, 0, 0] < 0) for _ in range(40)]  # white|black: flipped -> black
    assert 10 <= sum(flipped) <= 30


def test_random_crop_moves_within_the_image(folders):
    instance, _ = folders
    dataset = DreamBoothDataset(instance, "sks", 64, center_crop=False)
    torch.manual_seed(0)
    colours = {tuple(dataset[0]["instance_pixels"][:, 32, 32].tolist()) for _ in range(30)}
    assert len(colours) >= 2  # the crop of the 192x64 image lands on different thirds


def test_collate_puts_instance_examples_first_then_class(folders):
    instance, classes = folders
    dataset = DreamBoothDataset(instance, "sks dog", 64, class_dir=classes, class_prompt="dog")
    batch = collate_examples([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (4, 3, 64, 64) and batch["with_prior"]
    assert batch["prompts"] == ["sks dog", "sks dog", "dog", "dog"]
    torch.testing.assert_close(batch["pixel_values"][1], dataset[1]["instance_pixels"])
    torch.testing.assert_close(batch["pixel_values"][2], dataset[0]["class_pixels"])
    alone = collate_examples([DreamBoothDataset(instance, "sks dog", 64)[0]])
    assert alone["pixel_values"].shape == (1, 3, 64, 64) and alone["with_prior"] is False


# --------------------------------------------------------------------------------------------------------------------
# Latents


def test_encode_latents_matches_diffusers_sampling_and_scaling(folders, tiny_sd):
    vae = tiny_sd.vae
    pixels = DreamBoothDataset(folders[0], "sks", 64)[0]["instance_pixels"][None]
    ours = encode_latents(vae, pixels, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = vae.encode(pixels).latent_dist.sample(torch.Generator().manual_seed(3)) * vae.config.scaling_factor
    assert ours.shape == (1, 4, 8, 8)
    torch.testing.assert_close(ours, reference)


def test_latent_scaling_inverts_what_the_pipelines_do_before_decoding():
    mean, zero_std = torch.randn(2, 4, 3, 3), torch.zeros(2, 4, 3, 3)
    shifted = SimpleNamespace(scaling_factor=0.3611, shift_factor=0.1159)  # SD3/Flux: decode(z / scale + shift)
    torch.testing.assert_close(sample_latents(shifted, mean, zero_std) / 0.3611 + 0.1159, mean)
    channel_mean, channel_std = [0.1, -0.2, 0.3, 0.0], [0.9, 1.1, 1.0, 0.5]
    standardised = SimpleNamespace(scaling_factor=0.5, latents_mean=channel_mean, latents_std=channel_std)
    view = (1, 4, 1, 1)
    # SDXL pipeline: latents * latents_std / scaling_factor + latents_mean before vae.decode.
    decoded = sample_latents(standardised, mean, zero_std) * torch.tensor(channel_std).view(view) / 0.5
    torch.testing.assert_close(decoded + torch.tensor(channel_mean).view(view), mean)


def test_latent_cache_equals_direct_encoding_and_stores_flips(folders, tiny_sd):
    instance, classes = folders
    dataset = DreamBoothDataset(instance, "sks dog", 64, class_dir=classes, class_prompt="dog", random_flip=True)
    cache = LatentCache.build(dataset, tiny_sd.vae, batch_size=3)
    assert len(cache) == len(dataset) and len(cache.instance_moments) == 3 and len(cache.class_moments) == 2
    for moments, path in [(cache.instance_moments[1], dataset.instance_images[1]), (cache.class_moments[0], None)]:
        path = path or dataset.class_images[0]
        both = torch.stack([dataset.pixels(path), dataset.pixels(path, flip=True)])
        mean, std = latent_moments(tiny_sd.vae, both)
        torch.testing.assert_close(moments[0], mean, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(moments[1], std, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(cache.instance_moments[1][0][0], cache.instance_moments[1][0][1])  # flip differs
    batch = collate_examples([cache[0], cache[1]])
    assert batch["latents"].shape == (4, 4, 8, 8) and batch["prompts"] == ["sks dog", "sks dog", "dog", "dog"]
    # A cached sample is mean + std * noise, scaled: with std this small it sits next to the scaled mean.
    scale = tiny_sd.vae.config.scaling_factor
    sample = cache[2]["instance_latents"]
    means = cache.instance_moments[2][0] * scale
    assert min((sample - mean).abs().max() for mean in means) < 6 * float(cache.instance_moments[2][1].max()) * scale


def test_latent_cache_refuses_random_crops(folders, tiny_sd):
    dataset = DreamBoothDataset(folders[0], "sks", 64, center_crop=False)
    with pytest.raises(DataError, match="center_crop=True"):
        LatentCache.build(dataset, tiny_sd.vae)
