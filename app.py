"""Gradio demo of the skin-lesion classifier, for people who are not engineers.

By default the page is a client of the running TorchServe (``make serve``); if none answers
it starts one from the run folder, as ``make serve`` would, and stops it on exit. ``--local``
runs the same handler code in this process instead. It binds to 127.0.0.1 unless told
otherwise, and makes no public share link unless ``--share`` is given.

Example:
    python app.py                      # http://127.0.0.1:7860, predictions from http://127.0.0.1:8080
    python app.py --local --port 7861  # no TorchServe: the handler code in-process
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import gradio as gr

from demo.client import (
    DEFAULT_CHECKPOINT, DEFAULT_MODEL_CONFIG, DEFAULT_RUN_DIR, DEFAULT_URL, Backend, DemoError, LocalBackend, connect,
    load_handler_settings, load_preprocess)
from demo.presentation import (
    OverlayRenderer, class_choices, error_html, example_images, notice_html, probability_figure, summary_html)
from handler.errors import RequestError
from handler.labels import lesion_class
from handler.preprocessing import decode_image
from scripts import serve

logger = logging.getLogger("demo")
ROOT = Path(__file__).resolve().parent
TITLE = "Dermoscopic skin-lesion classifier (research demo)"


def analyse(backend: Backend, renderer: OverlayRenderer, path: str | None, target_class: str,
            opacity: float) -> tuple[Any, ...]:
    """Predict one uploaded image and build every output of the page.

    Args:
        backend: Where predictions come from.
        renderer: Draws the Grad-CAM overlay at the chosen opacity.
        path: The uploaded file, or None when the upload was cleared.
        target_class: Class code to explain, or ``""`` for the suggested (predicted) class.
        opacity: Heatmap opacity, 0..1.

    Returns:
        ``(error, summary, chart, original, overlay, state)``; on failure only the error is filled.
    """
    cleared = ("", "", None, None, None, None)
    if not path:
        return cleared
    try:
        image = Path(path).read_bytes()
        body = backend.predict(image, target_class or None)
        gradcam = body["gradcam"]
        if not renderer.check_matches(gradcam):
            raise DemoError("the served model crops images differently from the demo's --checkpoint, so its "
                            "heatmap cannot be drawn; start the demo with the served model's checkpoint")
        original = decode_image(image, renderer.settings.decode_limits).image
    except (DemoError, RequestError, OSError) as exc:
        logger.warning("could not analyse %s: %s", path, exc)
        return (error_html(str(exc)),) + cleared[1:]
    explained = lesion_class(gradcam["class"])
    overlay = gr.Image(value=renderer.render(original, gradcam["heatmap"], opacity),
                       label=f"Grad-CAM of {explained.name} ({explained.code})")
    state = {"path": path, "heatmap": gradcam["heatmap"]}
    return ("", summary_html(body, backend.description), probability_figure(body["probabilities"]), original,
            overlay, state)


def redraw_overlay(renderer: OverlayRenderer, state: dict[str, Any] | None, opacity: float) -> Any:
    """The overlay at a new opacity, from the heatmap already received: no new server call."""
    if not state:
        return gr.skip()
    original = decode_image(Path(state["path"]).read_bytes(), renderer.settings.decode_limits).image
    return renderer.render(original, state["heatmap"], opacity)


def build_demo(backend: Backend, renderer: OverlayRenderer, examples: list[tuple[Path, str]]) -> gr.Blocks:
    """The page: notice, upload and examples, class selector, opacity, results.

    Args:
        backend: Where predictions come from.
        renderer: Draws Grad-CAM overlays locally from the raw heatmap.
        examples: ``(path, caption)`` example images; empty for upload only.
    """
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.HTML(notice_html())
        gr.Markdown(f"## {TITLE}\nUpload a dermoscopic photograph of one skin lesion. The model returns a probability "
                    "for each of 7 HAM10000 diagnoses and a Grad-CAM heatmap of the image regions behind a class.")
        with gr.Row():
            with gr.Column(scale=2):
                upload = gr.File(label="Dermoscopic image: drop it here or click to upload", file_types=["image"],
                                 type="filepath", elem_id="upload")
                if examples:
                    gr.Examples(examples=[[str(image)] for image, _ in examples], inputs=[upload],
                                example_labels=[caption for _, caption in examples],
                                label="Example images (HAM10000 samples, read from the shared data folder)")
                else:
                    gr.Markdown("No example images: the HAM10000 samples folder was not found. Upload an image.")
                target = gr.Dropdown(choices=class_choices(), value="", label="Explain which class (Grad-CAM)",
                                     elem_id="target-class")
                opacity = gr.Slider(0.0, 1.0, value=renderer.settings.gradcam_alpha, step=0.05,
                                    label="Heatmap opacity", elem_id="opacity")
            with gr.Column(scale=3):
                error = gr.HTML(elem_id="status")
                summary = gr.HTML(elem_id="summary-box")
                chart = gr.Plot(label="Class probabilities", elem_id="probabilities")
        with gr.Row():
            original = gr.Image(label="Original", elem_id="original", interactive=False)
            overlay = gr.Image(label="Grad-CAM overlay", elem_id="overlay", interactive=False)
        gr.Markdown("The heatmap covers the centre crop the model saw. It is scaled to its own maximum, so even a "
                    "class with a probability near 0 shows bright regions: it shows where the model looked for that "
                    "class, not whether the answer is right.")
        state = gr.State(None)

        def run(path: str | None, target_class: str, alpha: float) -> tuple[Any, ...]:
            return analyse(backend, renderer, path, target_class, alpha)

        def redraw(current: dict[str, Any] | None, alpha: float) -> Any:
            return redraw_overlay(renderer, current, alpha)

        outputs = [error, summary, chart, original, overlay, state]
        upload.change(run, inputs=[upload, target, opacity], outputs=outputs)
        target.change(run, inputs=[upload, target, opacity], outputs=outputs)
        opacity.change(redraw, inputs=[state, opacity], outputs=[overlay], trigger_mode="always_last",
                       show_progress="hidden")
    return page


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    data = Path(os.environ.get("SKIN_LESION_DATA", ROOT.parent / "shared" / "data"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="TorchServe inference API")
    parser.add_argument("--run-dir", default=str(DEFAULT_RUN_DIR), help="the server's run folder (token in key_file.json)")
    parser.add_argument("--no-start", action="store_true", help="fail instead of starting TorchServe when none answers")
    parser.add_argument("--local", action="store_true", help="run the handler code in this process, without TorchServe")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT),
                        help="model for --local; its preprocessing places the heatmap in either mode")
    parser.add_argument("--model-config", default=str(DEFAULT_MODEL_CONFIG), help="handler settings (overlay style, limits)")
    parser.add_argument("--examples", default=str(data / "samples-600x450"), help="folder of example images with metadata.csv")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; anything but loopback exposes the page")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a temporary public gradio.live link")
    return parser


def main(args: argparse.Namespace) -> int:
    """Connect to (or start) the backend and serve the page until interrupted; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM acts as Ctrl-C: gradio closes its server, and a TorchServe the demo started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    settings = load_handler_settings(Path(args.model_config))
    started: serve.Server | None = None
    try:
        if args.local:
            backend: Backend = LocalBackend(Path(args.checkpoint), settings)
        else:
            backend, started = connect(args.url.rstrip("/"), Path(args.run_dir), start_if_down=not args.no_start)
        renderer = OverlayRenderer(load_preprocess(Path(args.checkpoint)), settings)
        examples = example_images(Path(args.examples))
        if not examples:
            logger.info("no example images in %s: upload only", args.examples)
        logger.info("predictions from %s", backend.description)
        page = build_demo(backend, renderer, examples)
        # The examples stay in the shared data folder; gradio serves files outside the repository only from allowed_paths.
        page.launch(server_name=args.host, server_port=args.port, share=args.share, ssr_mode=False,
                    allowed_paths=[str(Path(args.examples).resolve())] if examples else None)
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if started is not None:
            logger.info("stopping the TorchServe the demo started (pid %s)", started.launcher_pid)
            serve.stop(started)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
