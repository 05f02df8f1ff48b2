"""The TorchServe handler class with a mock context: no server needed."""

import json
import shutil

import pytest
import yaml

from handler.skin_lesion_handler import SkinLesionHandler
from ops.paths import MODEL_CONFIG


class RecordingMetric:
    def __init__(self, log, name):
        self.log, self.name = log, name

    def add_or_update(self, value, dimension_values=()):
        self.log.append((self.name, value, list(dimension_values)))


class RecordingMetrics:
    """Stands in for TorchServe's metrics cache and records every update."""

    def __init__(self):
        self.log = []

    def get_metric(self, name, metric_type):
        return RecordingMetric(self.log, name)


class MockContext:
    """The parts of ts.context.Context the handler uses."""

    def __init__(self, model_dir, handler_settings):
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None, "batch_size": 8}
        self.manifest = {"model": {"modelName": "skin_lesion", "serializedFile": "skin_lesion.pt", "modelVersion": "7.7"}}
        self.model_yaml_config = {"handler": handler_settings}
        self.statuses, self.content_types, self.headers = {}, {}, {}
        self.metrics = RecordingMetrics()

    def set_response_status(self, code=200, phrase="", idx=0):
        self.statuses[idx] = code

    def set_response_content_type(self, idx, value):
        self.content_types[idx] = value

    def get_request_header(self, idx, key):
        return self.headers.get(idx, {}).get(key)


@pytest.fixture()
def context(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint, tmp_path / "skin_lesion.pt")
    settings = yaml.safe_load(MODEL_CONFIG.read_text())["handler"]
    # The tiny random checkpoint has no input gate, which the served config requires of a release.
    settings["require_input_gate"] = False
    return MockContext(tmp_path, settings)


def test_a_release_config_refuses_a_checkpoint_without_a_gate(tmp_path, tiny_checkpoint):
    shutil.copy(tiny_checkpoint, tmp_path / "skin_lesion.pt")
    settings = yaml.safe_load(MODEL_CONFIG.read_text())["handler"]
    assert settings["require_input_gate"] is True
    with pytest.raises(ValueError, match="no input gate"):
        SkinLesionHandler().initialize(MockContext(tmp_path, settings))


def test_initialize_reads_settings_from_model_config(context):
    handler = SkinLesionHandler()
    handler.initialize(context)
    assert handler.initialized and handler.model_version == "7.7"
    assert handler.settings.referral_threshold == yaml.safe_load(
        MODEL_CONFIG.read_text())["handler"]["referral_threshold"]
    assert str(handler.device) == "cpu"


def test_handle_sets_a_status_per_request(context, sample_jpeg):
    handler = SkinLesionHandler()
    handler.initialize(context)
    bodies = handler.handle([{"body": sample_jpeg}, {"body": b"garbage"}, {"body": {"image": ""}}], context)
    assert context.statuses == {0: 200, 1: 415, 2: 400}
    assert set(context.content_types.values()) == {"application/json"}
    decoded = [json.loads(b) for b in bodies]
    assert decoded[0]["model_version"] == "7.7" and len(decoded[0]["probabilities"]) == 7
    assert decoded[1]["error"]["code"] == "invalid_image"
    assert decoded[2]["error"]["code"] == "missing_image"


def test_unknown_handler_setting_fails_initialize(context):
    context.model_yaml_config = {"handler": {"batch_size_typo": 3}}
    with pytest.raises(ValueError, match="unknown handler settings"):
        SkinLesionHandler().initialize(context)


def test_handle_publishes_metrics_per_request_and_per_batch(context, sample_jpeg):
    handler = SkinLesionHandler()
    handler.initialize(context)
    context.headers = {1: {"explain": "True"}}
    bodies = [json.loads(b) for b in handler.handle([{"body": sample_jpeg}, {"body": sample_jpeg}, {"body": b"x"}], context)]
    log = context.metrics.log
    requests = sorted(dims for name, _, dims in log if name == "skin_lesion_requests_total")
    assert requests == [["skin_lesion", "explain", "ok"], ["skin_lesion", "predict", "invalid_image"],
                        ["skin_lesion", "predict", "ok"]]
    predicted = [dims[1] for name, _, dims in log if name == "skin_lesion_predictions_total"]
    assert predicted == [bodies[0]["prediction"]] * 2
    assert [v for name, v, _ in log if name == "skin_lesion_batch_size"] == [3.0]
    confidences = [v for name, v, _ in log if name == "skin_lesion_top_confidence_tenths"]
    assert confidences == [10 * max(bodies[0]["probabilities"].values())] * 2
    for name in ("skin_lesion_preprocess_seconds", "skin_lesion_inference_seconds", "skin_lesion_gradcam_seconds"):
        assert [v for n, v, _ in log if n == name][0] > 0
