"""scripts/explain.py names, explains and rates each image exactly as POST /explanations/skin_lesion does.

Through real TorchServe serving the released archive: the script must read the served settings
(decision rule, referral threshold, TTA, runtime) and prepare the model as a worker does, input
gate included. A released checkpoint with a gate may refuse an image; then both must refuse it.
"""

import dataclasses

import numpy as np
import pytest
import torch

from handler.checkpoint import load_checkpoint
from handler.inference import prepare_for_serving
from handler.settings import HandlerSettings, load_handler_settings
from lab.explanations import explain_files
from ops.paths import CHECKPOINT, MODEL_CONFIG
from scripts import explain
from tests.conftest import post

pytestmark = [pytest.mark.slow, pytest.mark.data]

# Real samples of five classes. Under HandlerSettings' defaults (the most_probable rule, referral
# threshold 0.5), which the script used to answer with, release 1.5.0's networks name nv instead
# of mel (bkl ISIC_0025032, mel ISIC_0034256), akiec (ISIC_0026083) or df (nv ISIC_0032071), and
# rate ISIC_0032123 (bkl, malignant probability 0.11) low instead of high; ISIC_0024354 reads the same.
IMAGES = ("ISIC_0024354.jpg", "ISIC_0025032.jpg", "ISIC_0034256.jpg", "ISIC_0026083.jpg", "ISIC_0032071.jpg",
          "ISIC_0032123.jpg")


def test_explain_script_answers_like_the_served_explanations_api(torchserve, samples_dir, tmp_path):
    paths = [samples_dir / name for name in IMAGES]
    results = explain.main(explain.get_args_parser().parse_args([*map(str, paths), "--out", str(tmp_path)]))
    assert [path for path, _, _ in results] == paths
    for path, response, panel in results:
        served = post(torchserve, path.read_bytes(), explain=True, content_type=None, timeout=120)
        assert response.status == served.status_code, (path.name, served.text[:300])
        if not response.ok:  # refused by the input gate (or another request error): the same refusal
            assert response.body.code == served.json()["error"]["code"] and panel is None
            continue
        ours, theirs = response.body, served.json()
        assert (ours.prediction, ours.gradcam.class_code, ours.risk) == (
            theirs["prediction"], theirs["gradcam"]["class"], theirs["risk"]), path.name
        assert ours.decision_rule == theirs["decision_rule"] and ours.model_version == theirs["model_version"]
        assert dataclasses.asdict(ours.referral) == theirs["referral"]
        assert list(ours.probabilities) == list(theirs["probabilities"])
        assert np.allclose(list(ours.probabilities.values()), list(theirs["probabilities"].values()), atol=1e-4)
        assert (ours.input_check is None) == (theirs.get("input_check") is None)
        if ours.input_check is not None:
            assert ours.input_check.in_distribution == theirs["input_check"]["in_distribution"]
        assert np.allclose(ours.gradcam.heatmap, theirs["gradcam"]["heatmap"], atol=0.01)
        assert panel is not None and panel.exists()


def test_the_images_tell_the_served_settings_from_the_defaults(samples_dir):
    """Guards the test above: with the old script's settings these images are answered differently."""
    paths = [samples_dir / name for name in IMAGES]
    answers = {}
    for name, settings in (("served", load_handler_settings(MODEL_CONFIG)), ("defaults", HandlerSettings())):
        settings = dataclasses.replace(settings, runtime="eager", torch_threads=0, require_input_gate=False)
        loaded = load_checkpoint(CHECKPOINT)
        prepare_for_serving(loaded, settings)
        with torch.inference_mode():
            answers[name] = [(r.body.prediction, r.body.gradcam.class_code, r.body.risk) if r.ok else r.status
                             for r in explain_files(loaded, settings, paths, allow_out_of_distribution=True)]
    differing = [name for name, served, default in zip(IMAGES, answers["served"], answers["defaults"]) if served != default]
    assert differing, answers
