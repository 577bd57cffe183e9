"""The command line's main jobs, run in-process in tiny mode."""

from PIL import Image

from dreambooth_lib.cli import main


def test_generate_writes_a_grid(tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["generate", "--prompt", "a photo of sks dog", "--num-images", "2", "--steps", "2", "--out", str(out)]
    assert main(args) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 64 + 2, 64)
    assert "mode:" in capsys.readouterr().out
