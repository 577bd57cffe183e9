"""The training form, the live loss plot and the memory estimate behind them, all built headlessly (no browser)."""

import html
import io

import numpy as np
import pytest
from PIL import Image

from dreambooth_lib import widgets
from dreambooth_lib.config import PRESETS, TrainConfig
from dreambooth_lib.memory import FAMILIES, FP32_ACTIVATION_FACTOR, GIB, estimate_memory_gib, memory_table


def shown_message(form: widgets.TrainForm) -> str:
    """The form's message line as a person reads it (HTML entities decoded)."""
    return html.unescape(form.message.value)


@pytest.fixture
def notebook_config() -> TrainConfig:
    """What a notebook would pass: the tiny preset with its own subject."""
    return TrainConfig.preset(
        "tiny-cpu",
        instance_dir="data/scenes/teal_room",
        instance_prompt="a photo of sks room",
        class_prompt="a photo of a room",
        output_dir="outputs/test-form",
    )


@pytest.fixture
def fake_train(monkeypatch):
    """Replace the training function; records the configs it was called with."""
    calls = []

    def record(config, callbacks=()):
        calls.append((config, list(callbacks)))
        for step in (1, 2, 3):  # report three steps, as the loop does after each optimiser step
            for callback in callbacks:
                callback(step, {"step": step, "loss": 1.0 / step, "instance_loss": 0.5 / step, "lr": 1e-4})
        return "trained"

    monkeypatch.setattr("dreambooth_lib.train.train", record)
    return calls


def test_untouched_form_gives_the_notebooks_config(notebook_config):
    form = widgets.TrainForm(notebook_config)
    assert form.validated_config().to_dict() == notebook_config.to_dict()
    assert "settings are valid" in shown_message(form)


def test_changed_fields_give_a_validated_config(notebook_config):
    form = widgets.TrainForm(notebook_config)
    form.set("max_steps", 7)
    form.set("learning_rate", 2e-4)
    form.set("use_lora", True)
    form.set("text_encoder_lr", 3e-5)
    form.set("validation_prompts", ["a photo of sks room with a piano", "a photo of sks room at night"])
    config = form.validated_config()
    assert isinstance(config, TrainConfig)
    assert (config.max_steps, config.learning_rate, config.use_lora, config.text_encoder_lr) == (7, 2e-4, True, 3e-5)
    assert config.validation_prompts == ["a photo of sks room with a piano", "a photo of sks room at night"]
    # Fields the form does not show keep the notebook's values.
    assert (config.instance_dir, config.output_dir) == ("data/scenes/teal_room", "outputs/test-form")
    # An optional number emptied in the form means None.
    form.set("text_encoder_lr", None)
    assert form.config.text_encoder_lr is None


def test_every_field_has_a_widget_with_its_help_and_range():
    names = list(TrainConfig.__dataclass_fields__)
    form = widgets.TrainForm(TrainConfig.preset("tiny-cpu"), fields=names)
    assert form.config.to_dict() == TrainConfig.preset("tiny-cpu").to_dict()
    assert widgets.help_text("resolution") == "training image side (a multiple of 8) [8 to 4096 px]"
    assert isinstance(form.inputs["mixed_precision"], widgets.widgets.Dropdown)
    assert list(form.inputs["mixed_precision"].options) == ["no", "fp16", "bf16"]


def test_invalid_value_shows_the_message_and_does_not_train(notebook_config, fake_train):
    form = widgets.TrainForm(notebook_config)
    form.set("resolution", 65)
    assert "resolution=65 must be a multiple of 8" in shown_message(form)
    assert form.train() is None
    assert fake_train == []
    assert "Cannot start" in shown_message(form) and "resolution=65" in shown_message(form)


def test_text_that_is_not_a_number_is_reported_by_field_name(notebook_config, fake_train):
    form = widgets.TrainForm(notebook_config)
    form.inputs["text_encoder_lr"].value = "fast"
    assert "text_encoder_lr='fast': expected a float" in shown_message(form)
    assert form.train() is None and fake_train == []


def test_settings_this_machine_cannot_run_are_refused_but_still_estimated(notebook_config, fake_train):
    form = widgets.TrainForm(notebook_config)
    form.set("mixed_precision", "fp16")  # the tests run on a CPU
    assert "needs a CUDA GPU" in shown_message(form)
    assert "GiB" in form.memory.value or "MiB" in form.memory.value
    assert form.train() is None and fake_train == []


def test_valid_form_trains_once_with_its_config_and_a_live_plot(notebook_config, fake_train):
    form = widgets.TrainForm(notebook_config)
    form.set("max_steps", 3)
    assert form.train() == "trained"
    [(config, callbacks)] = fake_train
    assert config.max_steps == 3 and config.instance_prompt == "a photo of sks room"
    plot = callbacks[0]
    assert isinstance(plot, widgets.LiveLossPlot)
    assert plot.history["loss"] == [(1, 1.0), (2, 0.5), (3, 1 / 3)]
    # Three steps never reach a redraw step (every 5): the curve is drawn once more when training ends.
    assert Image.open(io.BytesIO(plot.widget.value)).format == "PNG"
    assert plot.widget in form.output.children


def test_preset_refills_the_fields_and_keeps_the_subject(notebook_config):
    form = widgets.TrainForm(notebook_config)
    form.preset.value = "sd15-full-t4"  # as a person choosing it in the dropdown
    t4 = PRESETS["sd15-full-t4"]
    assert form.inputs["max_steps"].value == t4.max_steps == 800
    assert form.inputs["use_8bit_adam"].value is True and form.inputs["mixed_precision"].value == "fp16"
    config = form.config
    assert config.model == t4.model  # not in the form: taken from the preset
    assert (config.instance_prompt, config.instance_dir) == ("a photo of sks room", "data/scenes/teal_room")
    form.apply_preset(widgets.NOTEBOOK_DEFAULTS)
    assert form.config.to_dict() == notebook_config.to_dict()


def test_memory_line_follows_the_settings():
    form = widgets.TrainForm(PRESETS["sd15-full-t4"])
    with_8bit = form.memory.value
    form.set("use_8bit_adam", False)
    assert form.memory.value != with_8bit
    assert "does not fit a T4" in form.memory.value and "fits a T4" in with_8bit


def test_memory_estimate_falls_with_8bit_adam_lora_and_checkpointing():
    full = PRESETS["sd15-full-t4"].replace(use_8bit_adam=False, gradient_checkpointing=False)
    base = estimate_memory_gib(full)
    trained = FAMILIES["sd"].unet + FAMILIES["sd"].text_encoders[0]
    # 8-bit AdamW: 2 instead of 8 bytes of state per trained parameter (UNet + text encoder).
    eight_bit = estimate_memory_gib(full.replace(use_8bit_adam=True))
    assert base.optimizer_states - eight_bit.optimizer_states == pytest.approx(6 * trained / GIB)
    # Gradient checkpointing keeps the measured fraction of the activations (about a quarter for SD 1.5).
    checkpointed = estimate_memory_gib(full.replace(gradient_checkpointing=True))
    sizes = FAMILIES["sd"].activations
    kept = (sizes.full_checkpointed + sizes.text_encoders) / (sizes.full + sizes.text_encoders)
    assert checkpointed.activations == pytest.approx(kept * base.activations) and 0.2 < kept < 0.3
    # LoRA trains ~1.6 M parameters (rank 8) instead of ~1 B: gradients and optimiser state all but vanish.
    lora = estimate_memory_gib(full.replace(use_lora=True, lora_rank=8))
    assert lora.gradients < 0.01 and lora.total < base.total - 10
    # Activations grow with the pixels and with prior preservation's extra class image per instance image.
    assert estimate_memory_gib(full.replace(resolution=1024)).activations == pytest.approx(4 * base.activations)
    no_prior = estimate_memory_gib(full.replace(with_prior_preservation=False))
    assert no_prior.activations == pytest.approx(base.activations / 2)
    # Without mixed precision: no 16-bit weight copies, and the activations grow by the measured fp32 factor. The
    # weights stay: everything is trained in fp32 but the VAE, which stays fp32 either way.
    fp32 = estimate_memory_gib(full.replace(mixed_precision="no"))
    assert fp32.weights == pytest.approx(base.weights)
    assert fp32.weight_copies == 0 and base.weight_copies == pytest.approx(2 * trained / GIB)
    assert fp32.activations == pytest.approx(FP32_ACTIVATION_FACTOR * base.activations)


def test_t4_presets_are_estimated_to_fit_a_t4():
    for name in ("sd15-full-t4", "sdxl-lora-t4"):
        assert estimate_memory_gib(PRESETS[name]).fits(15.0), name


def test_live_loss_plot_keeps_losses_and_redraws_every_few_steps():
    plot = widgets.LiveLossPlot(every=2)
    plot(1, {"step": 1, "loss": 0.5, "instance_loss": 0.3, "prior_loss": 0.2, "lr": 1e-4})
    assert len(plot.widget.value) == 0  # not a redraw step
    plot(2, {"step": 2, "loss": 0.4, "instance_loss": 0.25, "prior_loss": 0.15, "lr": 1e-4})
    assert set(plot.history) == {"loss", "instance_loss", "prior_loss"}
    assert plot.history["loss"] == [(1, 0.5), (2, 0.4)]
    plot(3, {"step": 3, "loss": 0.3, "instance_loss": 0.3, "prior_loss": float("nan"), "lr": 1e-4})  # no prior
    assert plot.history["prior_loss"] == [(1, 0.2), (2, 0.15)]
    picture = Image.open(io.BytesIO(plot.widget.value))
    assert picture.format == "PNG" and picture.width > 200


def test_image_rows_lays_out_one_labelled_row_per_entry():
    red, blue = Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (32, 32), (0, 0, 255))
    picture = widgets.image_rows({"before": [red, red, red], "after": [blue, blue]}, column_titles=["a", "b", "c"])
    pixels = np.asarray(picture).astype(int)
    is_red = (pixels[..., 0] > 200) & (pixels[..., 1] < 60) & (pixels[..., 2] < 60)
    is_blue = (pixels[..., 2] > 200) & (pixels[..., 0] < 60) & (pixels[..., 1] < 60)
    # Three red cells above two blue ones, each drawn at the same size.
    assert is_red.sum() == pytest.approx(1.5 * is_blue.sum(), rel=0.05)
    red_rows, blue_rows = np.nonzero(is_red.any(axis=1))[0], np.nonzero(is_blue.any(axis=1))[0]
    assert red_rows.max() < blue_rows.min()
    assert np.nonzero(is_blue.any(axis=0))[0].max() < np.nonzero(is_red.any(axis=0))[0].max()


def test_value_slider_redraws_the_image_for_the_new_value():
    seen = []

    def render(value):
        seen.append(value)
        return Image.new("RGB", (4, 4), (int(100 * value), 0, 0))

    box = widgets.value_slider(render, description="scale", value=1.0)
    slider, picture = box.children
    first = picture.value
    slider.value = 0.5
    assert seen == [1.0, 0.5] and picture.value != first
    assert box.static_png == first, "a static view shows the picture of the starting value"


def test_memory_table_has_one_row_per_setting_with_its_estimate_and_fit():
    plain = PRESETS["sd15-full-t4"].replace(mixed_precision="no", gradient_checkpointing=False, use_8bit_adam=False)
    configs = {"plain": plain, "T4 preset": PRESETS["sd15-full-t4"]}
    lines = memory_table(configs).splitlines()
    assert lines[0] == "| setting | estimated peak | weights + grads + optimiser | activations | T4 | A100 40 GB |"
    assert len(lines) == 2 + len(configs)
    for line, (name, config) in zip(lines[2:], configs.items(), strict=True):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        estimate = estimate_memory_gib(config)
        assert cells[:2] == [name, f"{estimate.total:.1f} GiB"]
        assert cells[4:] == ["fits" if estimate.fits(15.0) else "no", "fits" if estimate.fits(40.0) else "no"]
    assert lines[2].endswith("| no | fits |") and lines[3].endswith("| fits | fits |")


def test_interactive_figure_redraws_and_keeps_a_static_picture_of_its_defaults():
    import base64

    import ipywidgets
    import matplotlib.pyplot as plt

    def draw(level):
        figure, axis = plt.subplots(figsize=(1, 1))
        axis.imshow(np.full((4, 4, 3), level, dtype=np.uint8))
        axis.axis("off")
        return figure

    def centre_colour(png: bytes):
        picture = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        return tuple(picture[picture.shape[0] // 2, picture.shape[1] // 2])

    open_before = set(plt.get_fignums())  # other tests' figures are not this one's business
    shown = widgets.InteractiveFigure(draw, level=ipywidgets.IntSlider(value=40, min=0, max=255))
    bundle = shown._repr_mimebundle_()
    static = base64.b64decode(bundle["image/png"])
    assert centre_colour(static) == (40, 40, 40)
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == shown.widget.model_id
    shown.controls["level"].value = 200
    assert centre_colour(shown.picture.value) == (200, 200, 200)
    assert centre_colour(base64.b64decode(shown._repr_mimebundle_()["image/png"])) == (40, 40, 40)
    assert set(plt.get_fignums()) == open_before, "drawn figures must be closed, or Jupyter shows them a second time"


def test_loss_curve_leaves_the_notebook_backend_alone(tmp_path, matplotlib_backend):
    from dreambooth_lib.plots import loss_curve

    matplotlib = matplotlib_backend
    matplotlib.use("module://matplotlib_inline.backend_inline")  # what Jupyter uses
    rows = [{"step": step, "loss": 1 / step} for step in range(1, 41)]
    path = loss_curve(rows, tmp_path / "loss.png")
    assert matplotlib.get_backend() == "module://matplotlib_inline.backend_inline"
    assert Image.open(path).size == (600, 350)


def test_form_shows_its_settings_as_a_table_where_widgets_cannot_run(notebook_config):
    form = widgets.TrainForm(notebook_config)
    form.set("max_steps", 77)
    bundle = form._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == form.widget.model_id
    table = html.unescape(bundle["text/html"])
    assert "<code>max_steps</code></td><td>77</td>" in table
    assert "a photo of sks room" in table
    assert "GPU memory" in table
