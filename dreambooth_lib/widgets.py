"""Notebook widgets: a hyperparameter form built from TrainConfig, a live loss plot, labelled image grids, a slider.

The form is generated from the dataclass itself (each field's `metadata` gives its help text, unit and range or
choices), so a new TrainConfig field needs no widget code. It starts from the notebook's own config, so a notebook run
without anyone touching it (nbval, "Run all") trains with the notebook's defaults.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
import textwrap
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, get_type_hints

import ipywidgets as widgets
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from dreambooth_lib.config import KEY_SETTINGS, PRESETS, ConfigError, TrainConfig
from dreambooth_lib.environment import default_device
from dreambooth_lib.memory import REFERENCE_GPUS, estimate_memory_gib
from dreambooth_lib.plots import moving_average

# The settings a DreamBooth notebook asks about; the rest keep the notebook's values (the form accepts any list).
DEFAULT_FIELDS = tuple(name for name in KEY_SETTINGS if name not in ("model", "vae"))
# Describe the subject, not the hardware: choosing a preset keeps these as the notebook set them.
SUBJECT_FIELDS = ("instance_dir", "instance_prompt", "class_dir", "class_prompt", "validation_prompts", "output_dir")
NOTEBOOK_DEFAULTS = "(this notebook's settings)"

_HINTS = get_type_hints(TrainConfig)
_SPECS = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}


def _base_type(name: str) -> tuple[Any, bool]:
    """The field's type without `| None`, and whether None is allowed."""
    hint = _HINTS[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return next(option for option in options if option is not type(None)), type(None) in options


def help_text(name: str) -> str:
    """What the field means, with its unit and allowed range or choices, from the dataclass metadata."""
    metadata = _SPECS[name].metadata
    text = metadata["help"]
    unit = f" {metadata['unit']}" if metadata.get("unit") else ""
    if "range" in metadata:
        low, high = metadata["range"]
        text += f" [{low:g} to {high:g}{unit}]"
    elif unit:
        text += f" [{unit.strip()}]"
    return text


def field_widget(name: str, value: Any) -> widgets.Widget:
    """A widget suited to the field's type: checkbox, dropdown, number box, or text (empty text means None).

    Number boxes are unbounded on purpose: an out-of-range value must reach TrainConfig's validation, which names
    the allowed range, rather than being silently clamped.
    """
    metadata = _SPECS[name].metadata
    base, optional = _base_type(name)
    common = dict(description=name, tooltip=metadata["help"], style={"description_width": "190px"})
    if "choices" in metadata:
        # An optional choice (e.g. kind) offers "(none)" first, for None. Its value is "", not None: ipywidgets reads
        # value None as "nothing selected".
        choices = metadata["choices"]
        options = [("(none)", ""), *((choice, choice) for choice in choices)] if optional else choices
        return widgets.Dropdown(options=options, value="" if value is None else value, **common)
    if base is bool:
        return widgets.Checkbox(value=value, indent=False, **common)
    if base == list[str]:
        return widgets.Textarea(value="\n".join(value), placeholder="one per line", rows=2, **common)
    if optional or base is str:
        return widgets.Text(
            value="" if value is None else str(value), placeholder="(none)" if optional else "", **common
        )
    if base is int:
        return widgets.IntText(value=value, **common)
    return widgets.FloatText(value=value, **common)


def _read_widget(name: str, widget: widgets.Widget) -> Any:
    """The widget's value as the field's type; text that does not parse raises ConfigError naming the field."""
    base, optional = _base_type(name)
    value = widget.value
    if base == list[str]:
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(widget, widgets.Dropdown):
        return None if optional and value == "" else value
    if not isinstance(widget, widgets.Text):
        return value
    if optional and not value.strip():
        return None
    if base is str:
        return value
    try:
        return base(value)
    except ValueError as error:
        raise ConfigError(f"{name}={value!r}: expected a {base.__name__}, or leave it empty for none.") from error


class TrainForm:
    """A form over a TrainConfig: one row per field, a presets dropdown, a memory estimate and a message line.

    `form.config` is the notebook's config with the form's values; `form.train()` validates it and trains, or shows
    the validation message in the form instead of starting a run. Display the form with `display(form)` (or
    `form.widget`); change a field in code with `form.set(name, value)`.
    """

    def __init__(
        self,
        config: TrainConfig,
        fields: Sequence[str] = DEFAULT_FIELDS,
        presets: Mapping[str, TrainConfig] = PRESETS,
    ) -> None:
        unknown = [name for name in fields if name not in _SPECS]
        if unknown:
            raise ConfigError(f"TrainForm: unknown field(s) {unknown}; fields are TrainConfig's field names.")
        self.base = config.replace()
        self.presets = dict(presets)
        self.inputs = {name: field_widget(name, getattr(config, name)) for name in fields}
        self.preset = widgets.Dropdown(
            options=[NOTEBOOK_DEFAULTS, *self.presets], value=NOTEBOOK_DEFAULTS, description="preset"
        )
        self.memory = widgets.HTML()
        self.message = widgets.HTML()
        self.output = widgets.VBox([self.message])
        self._notebook_config = self.base
        self._refilling = False  # a preset refills many fields: check once at the end, not per field
        self.preset.observe(lambda change: self.apply_preset(change["new"]), names="value")
        for widget in self.inputs.values():
            widget.observe(lambda _change: self._refilling or self.refresh(), names="value")
        rows = [
            widgets.HBox([widget, widgets.HTML(html.escape(help_text(name)))]) for name, widget in self.inputs.items()
        ]
        self.widget = widgets.VBox([self.preset, *rows, self.memory, self.output])
        self.refresh()

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        return _widget_bundle(self.widget, {"text/plain": "TrainForm", "text/html": self.settings_html()})

    def settings_html(self) -> str:
        """The form's fields and values as a table: what a static view of the notebook shows in place of the form."""
        rows = "".join(
            f"<tr><td><code>{name}</code></td><td>{html.escape(repr(getattr(self.config, name)))}</td>"
            f"<td>{html.escape(help_text(name))}</td></tr>"
            for name in self.inputs
        )
        return f"<table><tr><th>setting</th><th>value</th><th>meaning</th></tr>{rows}</table>{self.memory.value}"

    # ----------------------------------------------------------------------------------------------------------------

    @property
    def config(self) -> TrainConfig:
        """The notebook's config (or the chosen preset) with the form's values; not yet validated."""
        return self.base.replace(**{name: _read_widget(name, widget) for name, widget in self.inputs.items()})

    def validated_config(self) -> TrainConfig:
        """The config, checked for the device training will run on; raises ConfigError naming the bad field."""
        return self.config.validate(default_device())

    def set(self, name: str, value: Any) -> None:
        """Change one field's widget, as a person typing into it would (the memory line and message follow)."""
        if name not in self.inputs:
            raise ConfigError(f"{name!r} is not in this form; its fields are {list(self.inputs)}.")
        base, _ = _base_type(name)
        widget = self.inputs[name]
        if base == list[str]:
            value = "\n".join(value)
        elif isinstance(widget, (widgets.Text, widgets.Dropdown)) and value is None:
            value = ""
        elif isinstance(widget, widgets.Text):
            value = str(value)
        widget.value = value

    def apply_preset(self, name: str) -> None:
        """Refill every field from a preset (or the notebook's own settings), keeping the subject's fields."""
        if name == NOTEBOOK_DEFAULTS:
            chosen = self._notebook_config
        elif name in self.presets:
            subject = {field: getattr(self.config, field) for field in SUBJECT_FIELDS if field in self.inputs}
            subject |= {field: getattr(self.base, field) for field in SUBJECT_FIELDS if field not in self.inputs}
            chosen = self.presets[name].replace(**subject)
        else:
            raise ConfigError(f"unknown preset {name!r}: choose one of {sorted(self.presets)}.")
        self.base = chosen
        self._refilling = True
        try:
            for field in self.inputs:
                self.set(field, getattr(chosen, field))
        finally:
            self._refilling = False
        if self.preset.value != name:
            self.preset.value = name
        self.refresh()

    # ----------------------------------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Re-check the settings and re-estimate memory; called on every change.

        The estimate needs only valid settings, not this machine: a T4 preset shows its memory on a laptop too, with
        the message saying why it would not run here.
        """
        try:
            config = self.config.validate()
        except ConfigError as error:
            self.show_error(error)
            self.memory.value = ""
            return
        estimate = estimate_memory_gib(config)
        fits = ", ".join(
            f"{'fits' if estimate.fits(gib) else 'does not fit'} a {name}" for name, gib in REFERENCE_GPUS.items()
        )
        self.memory.value = f"<b>GPU memory</b>: {html.escape(str(estimate))}; {fits}."
        try:
            config.validate(default_device())
        except ConfigError as error:
            self.show_error(error)
            return
        self.message.value = "<span style='color:green'>settings are valid</span>"

    def show_error(self, error: ConfigError) -> None:
        self.message.value = f"<span style='color:#c00'><b>Cannot start:</b> {html.escape(str(error))}</span>"

    def train(self, callbacks: Sequence[Callable[[int, dict], None]] = ()):
        """Validate the settings and train with a live loss plot (plus `callbacks`); on a bad setting show why and
        return None instead of starting a run. Returns `train()`'s TrainResult."""
        from IPython.display import display

        display(self.output)
        try:
            config = self.validated_config()
        except ConfigError as error:
            self.show_error(error)
            return None
        # Imported here: building a form must not need the whole training stack.
        from dreambooth_lib.train import train

        plot = LiveLossPlot()
        self.output.children = [self.message, plot.widget]
        result = train(config, callbacks=[plot, *callbacks])
        plot.redraw()  # the last steps, when they did not end on a redraw step
        return result


# --------------------------------------------------------------------------------------------------------------------
# Pictures. Figures are built without pyplot and handed over as PNG bytes or PIL images: they display the same in
# Jupyter, Colab and a headless run, whatever matplotlib backend the notebook uses, and never twice.


def figure_png(figure: Figure) -> bytes:
    """Render a matplotlib figure to PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=90)
    return buffer.getvalue()


class LiveLossPlot:
    """A loss curve that redraws while training runs: pass it to `train(config, callbacks=[plot])`.

    It keeps every logged value and redraws every `every` steps (drawing costs ~0.1 s, so not every step), with a
    running mean that makes the trend visible through the noise of random timesteps.
    """

    def __init__(self, every: int = 5, smoothing: int = 10) -> None:
        self.every = every
        self.smoothing = smoothing
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.widget = widgets.Image(format="png")

    def __call__(self, step: int, logs: Mapping[str, float]) -> None:
        for name, value in logs.items():
            # Runs without prior preservation log the class loss as NaN: nothing to draw.
            if "loss" in name and value is not None and not math.isnan(value):
                self.history.setdefault(name, []).append((step, float(value)))
        if step % self.every == 0:
            self.redraw()

    def redraw(self) -> None:
        if self.history:
            self.widget.value = figure_png(self.figure())

    def figure(self) -> Figure:
        figure = Figure(figsize=(6, 3))
        axes = figure.subplots()
        for name, points in self.history.items():
            steps, values = zip(*points, strict=True)
            line = axes.plot(steps, values, alpha=0.3, linewidth=1)[0]
            axes.plot(steps, moving_average(values, self.smoothing), color=line.get_color(), label=name)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even in a 20-step run
        axes.set_xlabel("step")
        axes.set_ylabel("loss (MSE)")
        axes.legend(loc="upper right")
        axes.grid(alpha=0.3)
        return figure


def image_rows(
    rows: Mapping[str, Sequence[Image.Image]],
    *,
    title: str | None = None,
    column_titles: Sequence[str] | None = None,
    size: float = 2.0,
) -> Image.Image:
    """One labelled row of images per entry, e.g. {"before": [...], "after": [...]} for the same seeds, as a picture.

    `column_titles` label the columns (e.g. the prompts); long titles are wrapped.
    """
    if not rows or not all(rows.values()):
        raise ValueError("image_rows needs at least one row, and every row at least one image.")
    columns = max(len(images) for images in rows.values())
    figure = Figure(figsize=(size * columns, size * len(rows) + (0.5 if column_titles else 0)))
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for row_axes, (label, images) in zip(axes, rows.items(), strict=True):
        for column, ax in enumerate(row_axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if column < len(images):
                ax.imshow(images[column])
            else:
                ax.axis("off")
        row_axes[0].set_ylabel(label, fontsize=9)
    for ax, text in zip(axes[0], column_titles or [], strict=False):
        ax.set_title(textwrap.fill(text, 28), fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    return Image.open(io.BytesIO(figure_png(figure))).convert("RGB")


def value_slider(
    render: Callable[[float], Image.Image],
    *,
    description: str,
    value: float = 1.0,
    low: float = 0.0,
    high: float = 1.5,
    step: float = 0.1,
) -> widgets.VBox:
    """A slider and the image `render(slider value)` draws; the image is redrawn when the slider is released."""
    slider = widgets.FloatSlider(
        value=value, min=low, max=high, step=step, description=description, continuous_update=False
    )
    picture = widgets.Image(format="png")

    def redraw(_change=None) -> None:
        buffer = io.BytesIO()
        render(slider.value).save(buffer, format="PNG")
        picture.value = buffer.getvalue()

    slider.observe(redraw, names="value")
    redraw()
    return _PictureBox([slider, picture], static_png=picture.value)


class _PictureBox(widgets.VBox):
    """A VBox that views unable to run widgets (GitHub, nbviewer, print) show as the picture of its starting value."""

    def __init__(self, children: Sequence[widgets.Widget], *, static_png: bytes) -> None:
        super().__init__(children)
        self.static_png = static_png

    def _ipython_display_(self, **kwargs: Any) -> None:  # IPython asks this first, under ipywidgets 7 and 8 alike
        from IPython.display import display

        static = {"text/plain": "slider", "image/png": base64.b64encode(self.static_png).decode("ascii")}
        display(_widget_bundle(self, static), raw=True)


class InteractiveFigure:
    """Controls and the matplotlib figure `draw(**values)` makes from their values, redrawn when a control changes.

    A static view of the notebook (GitHub, nbviewer, a printed handout) cannot run widgets, so the cell's output also
    carries a picture of the figure at the controls' starting values: Jupyter and Colab show the live controls, a
    static view shows that picture instead of nothing.
    """

    def __init__(self, draw: Callable[..., Figure], **controls: widgets.ValueWidget) -> None:
        self.draw = draw
        self.controls = controls
        self.picture = widgets.Image(format="png")
        for name, control in controls.items():
            control.description = control.description or name
            control.observe(self.redraw, names="value")
        self.redraw()
        self.static_png = self.picture.value
        self.widget = widgets.VBox([*controls.values(), self.picture])

    def redraw(self, _change: Any = None) -> None:
        figure = self.draw(**{name: control.value for name, control in self.controls.items()})
        self.picture.value = figure_png(figure)
        import matplotlib.pyplot as plt

        plt.close(figure)  # drawn with pyplot: without this, Jupyter would show it a second time

    def _repr_mimebundle_(self, **kwargs: Any) -> dict[str, Any]:
        static = {"text/plain": f"{type(self).__name__}({', '.join(self.controls)})"}
        return _widget_bundle(self.widget, static | {"image/png": base64.b64encode(self.static_png).decode("ascii")})


def _widget_bundle(widget: widgets.Widget, static: Mapping[str, Any]) -> dict[str, Any]:
    """A widget's display data plus `static`, what views that cannot run widgets (GitHub, nbviewer, print) show.

    Jupyter and Colab render the widget, the richest type they know; a static renderer skips the widget type it
    cannot draw and takes the next one, the picture or table.
    """
    view = {"version_major": 2, "version_minor": 0, "model_id": widget.model_id}
    return {**static, "application/vnd.jupyter.widget-view+json": view}
