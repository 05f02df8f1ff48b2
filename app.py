"""Gradio demo of the skin-lesion classifier, for people who are not engineers.

By default the page is a client of the running TorchServe (``make serve``); if none answers
it starts one from the run folder, as ``make serve`` would, and stops it on exit. ``--local``
runs the same handler code in this process instead.

Exposure: it binds to 127.0.0.1. Any other ``--host``, a TorchServe ``--url`` off this machine
(``http://0.0.0.0:8080`` would also start TorchServe on every interface) or a public ``--share``
link is refused unless ``--auth user:password`` (or ``--auth @file`` holding that line) puts a
login in front; ``--share`` relays every uploaded image through Gradio's share servers (a third
party) and also needs ``--allow-third-party-relay``.

Patient images: uploads are limited to ``--max-upload-mb``, land in a private temporary folder
made for this run, and each upload is deleted as soon as its request has been answered (the
page keeps the image in memory for re-drawing only). The images the page shows back are
written by Gradio to the same folder and deleted a few minutes later; the folder is removed
on exit.

Example:
    python app.py                      # http://127.0.0.1:7860, predictions from http://127.0.0.1:8080
    python app.py --local --port 7861  # no TorchServe: the handler code in-process
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import logging
import os
import shutil
import signal
import sys
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from demo.client import DEFAULT_URL, Backend, DemoError, LocalBackend, OutOfDistribution, connect, load_preprocess
from demo.presentation import (
    OverlayRenderer, class_choices, error_html, example_images, notice_html, out_of_distribution_html,
    probability_figure, summary_html)
from handler.errors import RequestError
from handler.labels import lesion_class
from handler.preprocessing import decode_image
from handler.settings import load_handler_settings
from ops.paths import CHECKPOINT, DATA, MODEL_CONFIG, RUN_DIR
from ops.torchserve import Server, stop

logger = logging.getLogger("demo")
TITLE = "Dermoscopic skin-lesion classifier (research demo)"
LOOPBACK_NAMES = {"localhost"}
# Images the page shows back (original, overlay) are files Gradio serves from its cache: they
# are deleted this many seconds after they were written, checked every CACHE_SWEEP_S.
SHOWN_IMAGE_LIFETIME_S = 300
CACHE_SWEEP_S = 60
# How long a page that is left open keeps its last image in memory (for opacity and class changes).
SESSION_IMAGE_TTL_S = 900
# The two kinds of map the service offers (handler.explainers); "faithful" costs several predictions.
EXPLANATION_CHOICES = [("Fast: Grad-CAM (coarse, free with the prediction)", "fast"),
                       ("Faithful: LayerCAM x Grad-CAM² (twice as fine, meets the explanation benchmark's targets)", "faithful")]
METHOD_TITLES = {"grad-cam": "Grad-CAM", "layercam-s16-x-grad-cam-squared": "LayerCAM x Grad-CAM² (twice as fine)"}


@dataclass(frozen=True)
class Uploads:
    """This run's uploads: where Gradio writes them, how large they may be, and which files are not patients'.

    Attributes:
        root: The run's private temporary folder (Gradio's ``GRADIO_TEMP_DIR``).
        max_bytes: The largest upload accepted.
        examples: SHA-256 digests of the example images, whose copies in ``root`` are kept.
    """

    root: Path
    max_bytes: int
    examples: frozenset[str] = frozenset()

    def read(self, path: str | Path) -> bytes:
        """The uploaded bytes.

        Raises:
            DemoError: If the file is larger than :attr:`max_bytes` (it is not read).
        """
        size = Path(path).stat().st_size
        if size > self.max_bytes:
            raise DemoError(f"The image is {size / 2**20:.1f} MB; the demo accepts images up to "
                            f"{self.max_bytes / 2**20:.0f} MB. Upload a smaller file.")
        return Path(path).read_bytes()

    def discard(self, path: str | Path | None) -> bool:
        """Delete an upload (and the folder Gradio made for it) once its request is answered.

        Only files inside :attr:`root` are touched, and never a copy of an example image.

        Returns:
            Whether a file was deleted.
        """
        if not path:
            return False
        file = Path(path).resolve()
        root = self.root.resolve()
        if root not in file.parents or not file.is_file():
            return False
        if hashlib.sha256(file.read_bytes()).hexdigest() in self.examples:
            return False
        file.unlink()
        folder = file.parent
        while folder != root and not any(folder.iterdir()):
            folder.rmdir()
            folder = folder.parent
        return True


def digests(paths: list[Path]) -> frozenset[str]:
    """SHA-256 of each file's bytes."""
    return frozenset(hashlib.sha256(path.read_bytes()).hexdigest() for path in paths)


def analyse(backend: Backend, renderer: OverlayRenderer, image: bytes | None, target_class: str,
            opacity: float, explanation: str = "fast") -> tuple[Any, ...]:
    """Predict one image and build every output of the page.

    Args:
        backend: Where predictions come from.
        renderer: Draws the Grad-CAM overlay at the chosen opacity.
        image: The image's bytes, or None when the upload was cleared.
        target_class: Class code to explain, or ``""`` for the suggested (predicted) class.
        opacity: Heatmap opacity, 0..1.
        explanation: ``fast`` (Grad-CAM) or ``faithful`` (LayerCAM x Grad-CAM²); the overlay is labelled with the method.

    Returns:
        ``(message, summary, chart, original, overlay, state)``; on failure only the message is
        filled (and the state, so that another class can be asked for without a new upload).
    """
    cleared = ("", "", None, None, None, None)
    if image is None:
        return cleared
    kept = {"image": image}
    try:
        body = backend.predict(image, target_class or None, explanation=explanation)
        gradcam = body["gradcam"]
        if not renderer.check_matches(gradcam):
            raise DemoError("the served model crops images differently from the demo's --checkpoint, so its "
                            "heatmap cannot be drawn; start the demo with the served model's checkpoint")
        original = decode_image(image, renderer.settings.decode_limits).image
    except OutOfDistribution as exc:
        # No probabilities and no heatmap: the model's classes mean nothing for this picture.
        logger.info("image refused by the input gate as %s (score %s, threshold %s)", exc.modality, exc.score,
                    exc.threshold)
        return (out_of_distribution_html(exc.score, exc.threshold, exc.modality, exc.advice), "", None, None, None, kept)
    except (DemoError, RequestError, OSError) as exc:
        logger.warning("could not analyse the image: %s", exc)
        return (error_html(str(exc)), "", None, None, None, kept)
    explained = lesion_class(gradcam["class"])
    overlay = gr.Image(value=renderer.render(original, gradcam["heatmap"], opacity),
                       label=f"{method_title(gradcam)} of {explained.name} ({explained.code})")
    state = {**kept, "heatmap": gradcam["heatmap"]}
    return ("", summary_html(body, backend.description), probability_figure(body["probabilities"]), original,
            overlay, state)


def method_title(gradcam: dict[str, Any]) -> str:
    """The map's method as the page names it (``grad-cam`` -> Grad-CAM); an unknown method by its own name."""
    method = str(gradcam.get("method", "grad-cam"))
    return METHOD_TITLES.get(method, method)


def analyse_upload(backend: Backend, renderer: OverlayRenderer, uploads: Uploads, path: str | None, target_class: str,
                   opacity: float, explanation: str = "fast") -> tuple[Any, ...]:
    """:func:`analyse` an uploaded file, then delete the upload whatever the outcome."""
    if not path:
        return analyse(backend, renderer, None, target_class, opacity, explanation)
    try:
        image = uploads.read(path)
    except (DemoError, OSError) as exc:
        logger.warning("could not read the upload: %s", exc)
        return (error_html(str(exc)), "", None, None, None, None)
    finally:
        uploads.discard(path)
    return analyse(backend, renderer, image, target_class, opacity, explanation)


def redraw_overlay(renderer: OverlayRenderer, state: dict[str, Any] | None, opacity: float) -> Any:
    """The overlay at a new opacity, from the image and heatmap already received: no new server call."""
    if not state or "heatmap" not in state:
        return gr.skip()
    original = decode_image(state["image"], renderer.settings.decode_limits).image
    return renderer.render(original, state["heatmap"], opacity)


def build_demo(backend: Backend, renderer: OverlayRenderer, examples: list[tuple[Path, str]], uploads: Uploads) -> gr.Blocks:
    """The page: notice, upload and examples, class selector, opacity, results.

    Args:
        backend: Where predictions come from.
        renderer: Draws Grad-CAM overlays locally from the raw heatmap.
        examples: ``(path, caption)`` example images; empty for upload only.
        uploads: Where uploads land, their size limit, and which files are examples.
    """
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(CACHE_SWEEP_S, SHOWN_IMAGE_LIFETIME_S)) as page:
        gr.HTML(notice_html())
        gr.Markdown(f"## {TITLE}\nUpload a dermoscopic photograph of one skin lesion (up to "
                    f"{uploads.max_bytes / 2**20:.0f} MB). The model returns a probability for each of 7 HAM10000 "
                    "diagnoses and a Grad-CAM heatmap of the image regions behind a class. Uploads are deleted as "
                    "soon as they have been analysed.")
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
                explanation = gr.Radio(choices=EXPLANATION_CHOICES, value="fast", label="Explanation map",
                                       elem_id="explanation")
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
        # The image stays in this page's memory (never on disk) so that another class or opacity needs no new upload.
        state = gr.State(None, time_to_live=SESSION_IMAGE_TTL_S)

        def run_upload(path: str | None, target_class: str, alpha: float, kind: str) -> tuple[Any, ...]:
            return analyse_upload(backend, renderer, uploads, path, target_class, alpha, kind)

        def run_again(current: dict[str, Any] | None, target_class: str, alpha: float, kind: str) -> tuple[Any, ...]:
            if not current:
                return tuple(gr.skip() for _ in range(6))
            return analyse(backend, renderer, current["image"], target_class, alpha, kind)

        def redraw(current: dict[str, Any] | None, alpha: float) -> Any:
            return redraw_overlay(renderer, current, alpha)

        outputs = [error, summary, chart, original, overlay, state]
        upload.change(run_upload, inputs=[upload, target, opacity, explanation], outputs=outputs)
        target.change(run_again, inputs=[state, target, opacity, explanation], outputs=outputs)
        explanation.change(run_again, inputs=[state, target, opacity, explanation], outputs=outputs)
        opacity.change(redraw, inputs=[state, opacity], outputs=[overlay], trigger_mode="always_last",
                       show_progress="hidden")
    return page


def get_args_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help="TorchServe inference API")
    parser.add_argument("--run-dir", default=str(RUN_DIR), help="the server's run folder (token in key_file.json)")
    parser.add_argument("--no-start", action="store_true", help="fail instead of starting TorchServe when none answers")
    parser.add_argument("--local", action="store_true", help="run the handler code in this process, without TorchServe")
    parser.add_argument("--checkpoint", default=str(CHECKPOINT),
                        help="model for --local; its preprocessing places the heatmap in either mode")
    parser.add_argument("--model-config", default=str(MODEL_CONFIG), help="handler settings (overlay style, limits)")
    parser.add_argument("--examples", default=str(DATA / "samples-600x450"), help="folder of example images with metadata.csv")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; anything but loopback exposes the page and needs --auth")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true",
                        help="also make a temporary public gradio.live link; it relays patient images through Gradio's "
                             "servers (a third party): needs --auth and --allow-third-party-relay")
    parser.add_argument("--allow-third-party-relay", action="store_true",
                        help="accept that --share sends every uploaded image through Gradio's share servers")
    parser.add_argument("--auth", help="user:password required to open the page, or @FILE holding that line "
                                       "(a command line is visible to other users of this machine; prefer @FILE)")
    parser.add_argument("--max-upload-mb", type=float, default=16.0, help="largest image accepted, in MiB")
    return parser


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def login(args: argparse.Namespace) -> tuple[str, str] | None:
    """The ``(user, password)`` the page requires, or None; refuses exposure without one.

    Raises:
        DemoError: ``--share`` or a non-loopback ``--host`` without ``--auth``, or a malformed ``--auth``.
    """
    url_host = urllib.parse.urlsplit(args.url).hostname or ""
    exposed = [reason for reason, on in (("--share makes a public link", args.share),
                                         (f"--host {args.host} is reachable from other machines",
                                          not is_loopback(args.host)),
                                         (f"--url {args.url} is not on this machine (images would cross the network, "
                                          "and a TorchServe started for it would listen there)",
                                          not args.local and not is_loopback(url_host))) if on]
    if not args.auth:
        if exposed:
            raise DemoError(f"{' and '.join(exposed)}, and patient images would be open to anyone who finds it: "
                            "add --auth user:password (or --auth @FILE), or bind to 127.0.0.1")
        return None
    text = Path(args.auth[1:]).read_text().strip() if args.auth.startswith("@") else args.auth
    user, _, password = text.partition(":")
    if not user or not password:
        raise DemoError("--auth takes user:password (or @FILE holding that line), both non-empty")
    if args.share:
        if not args.allow_third_party_relay:
            raise DemoError("--share relays every uploaded patient image through Gradio's share servers, a third party: "
                            "serve the page behind your own TLS proxy instead, or add --allow-third-party-relay if "
                            "your data-protection rules allow that relay")
        logger.warning("--share: uploaded images travel through Gradio's share servers (a third party)")
    return user, password


def launch_options(args: argparse.Namespace, uploads: Uploads, examples: list[tuple[Path, str]]) -> dict[str, Any]:
    """The keyword arguments of ``Blocks.launch``: address, share link, login, upload limit, allowed paths.

    Raises:
        DemoError: See :func:`login`.
    """
    return {"server_name": args.host, "server_port": args.port, "share": args.share, "auth": login(args),
            "max_file_size": uploads.max_bytes, "ssr_mode": False,
            # The examples stay in the shared data folder; gradio serves files outside its cache only from allowed_paths.
            "allowed_paths": [str(Path(args.examples).resolve())] if examples else None}


def private_upload_folder() -> Path:
    """A new folder only this user can read, for this run's uploads (inside ``GRADIO_TEMP_DIR`` if that is set).

    Gradio reads ``GRADIO_TEMP_DIR`` when the page is built and launched, so this sets it.
    """
    parent = os.environ.get("GRADIO_TEMP_DIR") or None
    if parent is not None:
        # Gradio itself creates a missing GRADIO_TEMP_DIR, so a person may well name one that does not exist yet.
        Path(parent).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="skin-lesion-demo-", dir=parent))
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder


def main(args: argparse.Namespace) -> int:
    """Connect to (or start) the backend and serve the page until interrupted; returns the exit code."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM acts as Ctrl-C: gradio closes its server, and a TorchServe the demo started is stopped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    settings = load_handler_settings(Path(args.model_config))
    started: Server | None = None
    folder: Path | None = None
    try:
        login(args)  # refuse an exposed page before starting anything
        if args.local:
            backend: Backend = LocalBackend(Path(args.checkpoint), settings)
        else:
            backend, started = connect(args.url.rstrip("/"), Path(args.run_dir), start_if_down=not args.no_start)
        renderer = OverlayRenderer(load_preprocess(Path(args.checkpoint)), settings)
        examples = example_images(Path(args.examples))
        if not examples:
            logger.info("no example images in %s: upload only", args.examples)
        logger.info("predictions from %s", backend.description)
        folder = private_upload_folder()
        uploads = Uploads(folder, int(args.max_upload_mb * 2**20), digests([path for path, _ in examples]))
        page = build_demo(backend, renderer, examples, uploads)
        page.launch(**launch_options(args, uploads, examples))
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        if started is not None:
            logger.info("stopping the TorchServe the demo started (pid %s)", started.launcher_pid)
            stop(started)
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
