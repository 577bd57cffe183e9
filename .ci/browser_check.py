"""The browser half of .ci/browser-check: drives a Jupyter front end in a headless Chromium and checks the widgets.

It connects to a Chromium and a Jupyter server that .ci/browser-check started (and stops), then, in notebook 05, runs
the cells up to the training form, checks the form as drawn (preset menu, fields, memory line), picks a preset and
goes back, changes two settings by hand, runs the rest (training with its progress bar and live loss plot) and checks
that the run folder holds the settings changed in the page; in 01 and 04 it moves a slider and checks that the
picture's bytes change. Any widget error in the page (an error view, "model not found", a console error, an error in
a cell or a widget callback) fails the check with its message. Screenshots go to --shots, named after what they show.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jupyter_server.services.kernels.connection.base import deserialize_msg_from_ws_v1
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, sync_playwright

from dreambooth_lib.config import PRESETS
from dreambooth_lib.notebook import TINY_RUN_SETTINGS
from dreambooth_lib.widgets import DEFAULT_FIELDS, SUBJECT_FIELDS

FORM_NOTEBOOK = "05_dreambooth_sd15.ipynb"
FORM_CELL, TRAIN_CELL = "cell-21", "cell-29"  # the cell that shows the form, the one that trains
SLIDER_NOTEBOOKS = ("01_forward_diffusion.ipynb", "04_clip_conditioning.ipynb")
# Notebook 05 prints its run folder (a fresh temporary folder in tiny mode) as "run folder: PATH".
RUN_FOLDER = re.compile(r"run folder: (/\S+)")
# The settings changed by hand: a box whose change moves the memory estimate, and the run length.
TOGGLED, RETYPED = "gradient_checkpointing", ("max_steps", TINY_RUN_SETTINGS["max_steps"] + 5)
# Text of widget front-end failures, in ipywidgets 7 and 8 and the Jupyter front ends.
ERROR_TEXTS = ("Error displaying widget", "model not found", "Could not create a view", "Failed to load model class")
RUN_TIMEOUT_S = 300  # one run of cells; the notebooks' slowest stretch takes about two minutes in tiny mode


class CheckFailed(Exception):
    """A check did not hold; the message says which and what the page showed."""


@dataclass
class Watch:
    """What reached the page while the check ran: console errors from the widget machinery, page errors, and the
    kernel's error reports, read from its websocket. The last catch what no cell shows: JupyterLab puts the traceback
    of a failing widget callback in its log console, and the kernel sends a callback's failure only as stderr text."""

    errors: list[str] = field(default_factory=list)
    classic: bool = False  # which framing the kernel's binary websocket frames use
    widget_state_asked: bool = False  # the classic widget manager's start-up look at the kernel's widgets answered

    def attach(self, page: Page) -> None:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("websocket", lambda socket: socket.on("framereceived", self._kernel_message))

    def _console(self, message) -> None:
        text = message.text
        widget_related = any(word in text.lower() for word in ("widget", "model", "comm", "manager"))
        if message.type == "error" and widget_related:
            self.errors.append(f"console error: {text}")

    def _kernel_message(self, frame: str | bytes) -> None:
        if isinstance(frame, bytes) and self.classic:
            # The classic notebook's binary frames (messages with buffers): a count and offsets as big-endian 32-bit
            # integers, then the message as JSON and its buffers. (Read as the v1 protocol, the count is huge.)
            (count,) = struct.unpack_from("!I", frame)
            offsets = struct.unpack_from(f"!{count}I", frame, 4)
            message = json.loads(frame[offsets[0] : offsets[1]])
            kind, content = message.get("msg_type"), message.get("content", {})
        elif isinstance(frame, bytes):  # JupyterLab's binary kernel protocol
            _channel, parts = deserialize_msg_from_ws_v1(frame)
            kind, content = json.loads(parts[0]).get("msg_type"), json.loads(parts[3])
        else:  # the classic notebook's JSON messages
            message = json.loads(frame)
            kind, content = message.get("msg_type"), message.get("content", {})
        method = content.get("data", {}).get("method") if kind == "comm_msg" else None
        if kind == "comm_info_reply" or method == "update_states":
            self.widget_state_asked = True
        if kind == "error":
            self.errors.append(f"kernel error: {content.get('ename')}: {content.get('evalue')}")
        elif kind == "stream" and content.get("name") == "stderr" and "Traceback" in content.get("text", ""):
            last = [line for line in content["text"].splitlines() if line.strip()][-1]
            self.errors.append(f"kernel traceback: {last.strip()}")

    def raise_if_any(self, where: str) -> None:
        if self.errors:
            raise CheckFailed(f"{where}: " + " | ".join(self.errors))


# ------------------------------------------------------------------------------------------------------------------
# The two front ends, behind the same few calls: open a notebook, run a range of cells, find a cell's node.


class FrontEnd:
    name = ""

    def __init__(self, page: Page, base_url: str, token: str) -> None:
        self.page, self.base_url, self.token = page, base_url.rstrip("/"), token
        self.watch = Watch(classic=self.name == "classic")
        self.watch.attach(page)

    def cell(self, index: int):
        return self.page.locator(self.cell_selector).nth(index)

    def run(self, start: int, stop: int, on_poll=lambda: None) -> None:
        """Run cells start..stop-1 and wait for the kernel; a cell that raised fails the check with its error."""
        self.page.evaluate(self.run_script, [start, stop])
        deadline, state = time.monotonic() + RUN_TIMEOUT_S, {}
        while time.monotonic() < deadline:
            state = self.page.evaluate(self.state_script, [start, stop])
            if state["errors"]:
                raise CheckFailed(f"{self.name}: a cell raised: {state['errors'][0]}")
            self.watch.raise_if_any(f"{self.name}, cells {start}..{stop - 1}")
            if state["done"]:
                return
            on_poll()
            self.page.wait_for_timeout(250)
        raise CheckFailed(f"{self.name}: cells {start}..{stop - 1} did not finish; not run: {state.get('pending')}")

    def errors_in_outputs(self) -> list[str]:
        """Error outputs anywhere in the notebook, including those of widget callbacks shown under their cell."""
        return self.page.evaluate(self.state_script, [0, 0])["errors"]


class Lab(FrontEnd):
    """JupyterLab 4 (ipywidgets 8), driven through the application object it exposes (--expose-app-in-browser)."""

    name = "lab"
    notebook_selector = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"
    cell_selector = f"{notebook_selector} .jp-Cell"
    run_script = """([start, stop]) => {
        const notebook = window.jupyterapp.shell.currentWidget.content;
        notebook.activeCellIndex = start;
        notebook.extendContiguousSelectionTo(stop - 1);
        window.__run = window.jupyterapp.commands.execute('notebook:run-cell');
    }"""
    state_script = """([start, stop]) => {
        const panel = window.jupyterapp.shell.currentWidget;
        const errors = [];
        for (const cell of panel.content.widgets) {
            if (cell.model.type !== 'code') continue;
            for (const output of cell.model.outputs.toJSON())
                if (output.output_type === 'error') errors.push(output.ename + ': ' + output.evalue);
        }
        const cells = panel.content.widgets.slice(start, stop).filter(c => c.model.type === 'code');
        const pending = cells.filter(c => c.model.executionCount === null || c.promptNode.textContent.includes('*'))
            .map(c => panel.content.widgets.indexOf(c));
        // Right after a notebook opens its session can be briefly absent: that is not idle yet.
        const idle = panel.sessionContext.session?.kernel?.status === 'idle';
        return {errors, pending, done: pending.length === 0 && idle};
    }"""

    def open(self, notebook: str) -> None:
        # ?reset: a fresh workspace, without the tab of the notebook checked before (its saved widget outputs would
        # draw as "model not found", their kernel gone).
        self.page.goto(f"{self.base_url}/lab/tree/{notebook}?reset&token={self.token}")
        # The workspace may bring back the tab of a notebook checked before, current for a moment: wait for this one.
        self.page.wait_for_function(
            """(path) => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
                       return w && w.context && w.context.path === path && w.sessionContext
                              && w.sessionContext.session?.kernel?.status === 'idle'; }""",
            arg=notebook,
            timeout=120_000,
        )

    def close(self) -> None:
        """Shut the notebook's kernel down and close its tab, without a dialog."""
        self.page.evaluate(
            """async () => { const panel = window.jupyterapp.shell.currentWidget;
                             await panel.sessionContext.shutdown(); panel.dispose(); }"""
        )


class Classic(FrontEnd):
    """The classic notebook (nbclassic) with ipywidgets 7: the widget protocol Colab speaks."""

    name = "classic"
    notebook_selector = "#notebook-container"
    cell_selector = f"{notebook_selector} .cell"
    run_script = """([start, stop]) => {
        Jupyter.notebook.execute_cell_range(start, stop);
    }"""
    state_script = """([start, stop]) => {
        const errors = [];
        for (const cell of Jupyter.notebook.get_cells()) {
            if (cell.cell_type !== 'code') continue;
            for (const output of cell.output_area.outputs)
                if (output.output_type === 'error') errors.push(output.ename + ': ' + output.evalue);
        }
        const cells = Jupyter.notebook.get_cells().slice(start, stop).filter(c => c.cell_type === 'code');
        const pending = cells.filter(c => typeof c.input_prompt_number !== 'number')
            .map(c => Jupyter.notebook.find_cell_index(c));
        return {errors, pending, done: pending.length === 0 && !Jupyter.notebook.kernel_busy};
    }"""

    def open(self, notebook: str) -> None:
        self.watch.widget_state_asked = False
        self.page.goto(f"{self.base_url}/nbclassic/notebooks/{notebook}?token={self.token}")
        self.page.wait_for_function(
            "() => window.Jupyter && Jupyter.notebook && Jupyter.notebook.kernel"
            " && Jupyter.notebook.kernel.is_connected() && !Jupyter.notebook.kernel_busy"
            " && Jupyter.notebook.kernel.widget_manager !== undefined",
            timeout=120_000,
        )
        # On start the ipywidgets 7 manager asks the kernel for the widgets it already has (a comm_info request, as
        # ipywidgets 7.7.1's kernel closes the newer control comm) and makes a second model for any widget it does
        # not know yet. A widget shown before that answer came gets such a twin; its first view is then removed and
        # the output left hidden and empty. So the cells run only after the answer.
        wait_until(self, lambda: self.watch.widget_state_asked, "the widget manager never asked the kernel", 120)
        # A dialog (say "Notebook validation failed") covers the page and takes the clicks meant for the widgets.
        dialog = self.page.locator(".modal.in .modal-content")
        if dialog.count():
            raise CheckFailed(f"classic: {notebook} opens with a dialog: {' '.join(dialog.first.inner_text().split())}")

    def close(self) -> None:
        self.page.evaluate("() => Jupyter.notebook.session.delete()")
        self.page.wait_for_timeout(500)


# ------------------------------------------------------------------------------------------------------------------
# Reading and using widgets in the page. The same selectors hold for ipywidgets 7 and 8.

FIELDS_SCRIPT = """(node, names) => {
    const found = {};
    for (const box of node.querySelectorAll('.widget-inline-hbox')) {
        const labels = [...box.querySelectorAll('label, span')].map(l => l.textContent.trim());
        const input = box.querySelector('input, select, textarea');
        const name = names.find(n => labels.includes(n));
        if (!input || !name || name in found) continue;
        found[name] = input.type === 'checkbox' ? input.checked : input.value;
    }
    return found;
}"""
IMAGE_HASH_SCRIPT = """async (image) => {
    const bytes = await (await fetch(image.src)).arrayBuffer();
    const digest = await crypto.subtle.digest('SHA-256', bytes);
    return [...new Uint8Array(digest)].map(b => b.toString(16).padStart(2, '0')).join('') + ':' + bytes.byteLength;
}"""
# Counts the distinct states of a cell's progress bar and pictures while it runs: every update, however fast.
COUNT_UPDATES_SCRIPT = """(node) => {
    const seen = {progress: new Set(), pictures: new Set()};
    const look = () => {
        for (const bar of node.querySelectorAll('.progress-bar')) seen.progress.add(bar.style.width);
        for (const image of node.querySelectorAll('.widget-image, .jupyter-widgets img'))
            if (image.src) seen.pictures.add(image.src);
    };
    new MutationObserver(look).observe(node, {subtree: true, childList: true, attributes: true});
    window.__updates = () => ({progress: [...seen.progress], pictures: seen.pictures.size});
}"""


def same(shown, wanted) -> bool:
    """Whether a value as the page shows it is the config value."""
    if isinstance(wanted, bool) or wanted is None:
        return shown == wanted or (wanted is None and shown in ("", "(none)"))
    if isinstance(wanted, list):
        return [line.strip() for line in str(shown).splitlines() if line.strip()] == wanted
    if isinstance(wanted, int | float):
        try:
            return math.isclose(float(shown), wanted, rel_tol=1e-9)
        except ValueError:
            return False
    return shown == wanted


def page_errors(front: FrontEnd, where: str) -> None:
    """Fail on any widget error the page shows or reported."""
    text = front.page.inner_text("body")
    for needle in ERROR_TEXTS:
        if needle.lower() in text.lower():
            line = next(line for line in text.splitlines() if needle.lower() in line.lower())
            raise CheckFailed(f"{front.name} {where}: the page shows a widget error: {line.strip()}")
    errors = front.errors_in_outputs()
    if errors:
        raise CheckFailed(f"{front.name} {where}: an error in a cell or a widget callback: {errors[0]}")
    front.watch.raise_if_any(f"{front.name} {where}")


def shot(front: FrontEnd, locator, shots: Path, what: str) -> None:
    locator.scroll_into_view_if_needed()
    path = shots / f"{front.name}-{what}.png"
    locator.screenshot(path=path)
    print(f"   screenshot {path.name}")


def wait_until(front: FrontEnd, condition, what: str, timeout_s: float = 60) -> None:
    """Wait for a condition in the page; an error that reaches the page meanwhile fails at once with its message."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        front.watch.raise_if_any(front.name)
        if time.monotonic() > deadline:
            raise CheckFailed(f"{front.name}: {what}")
        front.page.wait_for_timeout(200)


# ------------------------------------------------------------------------------------------------------------------
# The checks.


def cell_index(folder: Path, notebook: str, cell_id: str) -> int:
    cells = json.loads((folder / notebook).read_text())["cells"]
    return next(index for index, cell in enumerate(cells) if cell.get("id") == cell_id)


def check_form(front: FrontEnd, folder: Path, shots: Path) -> None:
    """Notebook 05: the form drawn, a preset and back, two settings changed by hand, then the run they make."""
    front.open(FORM_NOTEBOOK)
    form_at, train_at = cell_index(folder, FORM_NOTEBOOK, FORM_CELL), cell_index(folder, FORM_NOTEBOOK, TRAIN_CELL)
    front.run(0, form_at + 1)
    cell = front.cell(form_at)
    fields = lambda: cell.evaluate(FIELDS_SCRIPT, list(DEFAULT_FIELDS))  # noqa: E731
    memory = lambda: cell.locator(".widget-html-content", has_text="GPU memory").inner_text()  # noqa: E731
    preset = cell.locator("select").first
    wait_until(front, lambda: len(fields()) == len(DEFAULT_FIELDS), f"the form lacks fields: has {sorted(fields())}")
    page_errors(front, "05 form drawn")
    notebook_values, memory_before = fields(), memory()
    if preset.input_value() != "(this notebook's settings)" or "GiB" not in memory_before + memory_before.replace(
        "MiB", "GiB"
    ):
        raise CheckFailed(f"{front.name}: form drawn without its preset menu or memory line: {memory_before!r}")
    steps = notebook_values[RETYPED[0]]
    if not same(steps, TINY_RUN_SETTINGS["max_steps"]):
        raise CheckFailed(f"{front.name}: max_steps shows {steps!r}, the notebook set {TINY_RUN_SETTINGS['max_steps']}")
    print(f"   form drawn: {len(notebook_values)} fields, memory line {memory_before!r}")
    shot(front, cell, shots, "05-form-drawn")

    # A preset fills every field but the subject's, then the notebook's own settings come back.
    preset.select_option("tiny-cpu")
    wanted = PRESETS["tiny-cpu"]
    wrong = lambda: {  # noqa: E731
        name: shown
        for name, shown in fields().items()
        if name not in SUBJECT_FIELDS and not same(shown, getattr(wanted, name))
    }
    wait_until(front, lambda: not wrong(), f"preset tiny-cpu drawn with other values: {wrong()}")
    shot(front, cell, shots, "05-form-preset-tiny-cpu")
    preset.select_option("(this notebook's settings)")
    wait_until(front, lambda: fields() == notebook_values, "the notebook's settings did not come back")

    # Two settings changed by hand: the memory line follows the box, the run gets both.
    toggle = cell.locator(f"input[type=checkbox][title={TOGGLED}]")
    toggle.click()
    wait_until(front, lambda: memory() != memory_before, f"the memory line did not follow {TOGGLED}: {memory()!r}")
    retyped = cell.locator(".widget-inline-hbox", has=front.page.get_by_text(RETYPED[0], exact=True)).locator("input")
    retyped.fill(str(RETYPED[1]))
    retyped.press("Enter")
    page_errors(front, "05 settings changed")
    changed = fields()
    if changed[TOGGLED] == notebook_values[TOGGLED] or not same(changed[RETYPED[0]], RETYPED[1]):
        raise CheckFailed(f"{front.name}: the changes did not take: {changed}")
    print(f"   changed {TOGGLED} and {RETYPED[0]}={RETYPED[1]}: memory line {memory()!r}")
    shot(front, cell, shots, "05-form-changed")

    check_training(front, folder, shots, (form_at, train_at), changed)


def check_training(front: FrontEnd, folder: Path, shots: Path, cells: tuple[int, int], shown) -> None:
    """The cells after the form, training with the form's settings: progress and loss plot live, the run folder."""
    form_at, train_at = cells
    train_cell = front.cell(train_at)
    train_cell.evaluate(COUNT_UPDATES_SCRIPT)
    live = []

    def snapshot_while_training() -> None:
        updates = front.page.evaluate("() => window.__updates()")
        if not live and updates["pictures"] >= 2 and "100%" not in updates["progress"][-1:]:
            live.append(updates)
            shot(front, train_cell, shots, "05-training-live")

    start = time.monotonic()
    front.run(form_at + 1, train_at + 1, on_poll=snapshot_while_training)
    print(f"   class images, samples before and training: {time.monotonic() - start:.0f} s")
    updates = front.page.evaluate("() => window.__updates()")
    print(f"   training: {len(updates['progress'])} progress-bar states, {updates['pictures']} loss-plot pictures")
    if len(updates["progress"]) < 3 or updates["pictures"] < 3:
        raise CheckFailed(f"{front.name}: progress or loss plot did not update while training: {updates}")
    page_errors(front, "05 training")
    shot(front, train_cell, shots, "05-training-done")
    printed = RUN_FOLDER.search(front.page.inner_text(front.notebook_selector))
    config_file = Path(printed.group(1) if printed else "(not printed)") / "config.json"
    if not config_file.is_file():
        raise CheckFailed(f"{front.name}: no run folder with a config.json at {config_file.parent}")
    used = json.loads(config_file.read_text())
    differ = {name: (value, used.get(name)) for name, value in shown.items() if not same(value, used.get(name))}
    if differ:
        raise CheckFailed(f"{front.name}: the run used other settings than the page showed (page, run): {differ}")
    print(f"   run folder {config_file.parent} written with the page's settings ({RETYPED[0]}={used[RETYPED[0]]})")
    start = time.monotonic()
    front.run(train_at + 1, front.page.locator(front.cell_selector).count())
    print(f"   the rest of 05: {time.monotonic() - start:.0f} s")
    page_errors(front, "05 after training")
    front.close()


def check_slider(front: FrontEnd, folder: Path, notebook: str, shots: Path) -> None:
    """Run the notebook up to its first slider, move it by a click on the track, and check that the picture's bytes
    change. (The cells after it are the nbval run's business: the check stays inside its time budget.)"""
    front.open(notebook)
    cells = json.loads((folder / notebook).read_text())["cells"]
    slider_at = next(index for index, cell in enumerate(cells) if "Slider(" in "".join(cell["source"]))
    front.run(0, slider_at + 1)
    page_errors(front, f"{notebook} run")
    cell = front.cell(slider_at)
    image = cell.locator(".jupyter-widgets img, img.widget-image").first
    track = cell.locator(".widget-hslider .noUi-target, .widget-hslider .ui-slider").first
    readout = cell.locator(".widget-hslider .widget-readout").first
    before, value_before = image.evaluate(IMAGE_HASH_SCRIPT), readout.inner_text()
    name = notebook[:2]
    shot(front, cell, shots, f"{name}-slider-before")
    box = track.bounding_box()
    front.page.mouse.click(box["x"] + box["width"] * 0.85, box["y"] + box["height"] / 2)
    wait_until(front, lambda: readout.inner_text() != value_before, f"{name}: the slider did not move")
    wait_until(front, lambda: image.evaluate(IMAGE_HASH_SCRIPT) != before, f"{name}: the picture did not change")
    page_errors(front, f"{notebook} slider")
    print(f"   {name}: slider {value_before} -> {readout.inner_text()}, picture bytes changed")
    shot(front, cell, shots, f"{name}-slider-after")
    front.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frontend", choices=("lab", "classic"), required=True)
    parser.add_argument("--url", required=True, help="the Jupyter server, http://127.0.0.1:PORT")
    parser.add_argument("--token", required=True)
    parser.add_argument("--cdp", required=True, help="the browser's DevTools address, http://127.0.0.1:PORT")
    parser.add_argument("--notebooks", type=Path, required=True, help="the folder the server serves")
    parser.add_argument("--shots", type=Path, required=True)
    args = parser.parse_args()
    with sync_playwright() as playwright:
        browser = playwright.chromium.connect_over_cdp(args.cdp)
        page = browser.contexts[0].new_page()
        page.set_viewport_size({"width": 1280, "height": 2400})  # the whole form in one screenshot
        front = (Lab if args.frontend == "lab" else Classic)(page, args.url, args.token)
        try:
            start = time.monotonic()
            check_form(front, args.notebooks, args.shots)
            print(f"   ({time.monotonic() - start:.0f} s)")
            for notebook in SLIDER_NOTEBOOKS:
                start = time.monotonic()
                check_slider(front, args.notebooks, notebook, args.shots)
                print(f"   ({time.monotonic() - start:.0f} s)")
        except (CheckFailed, PlaywrightError) as error:
            page.screenshot(path=args.shots / f"{args.frontend}-failure.png", full_page=True)
            (args.shots / f"{args.frontend}-failure.html").write_text(page.content())
            print(f"browser-check ({args.frontend}) FAILED: {error}", file=sys.stderr)
            return 1
    print(f"browser-check ({args.frontend}): the form, the training and the sliders work in the browser")
    return 0


if __name__ == "__main__":
    sys.exit(main())
