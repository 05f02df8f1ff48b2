"""The handler's metrics, scraped by a real Prometheus from a real TorchServe; alert rules checked by promtool."""

import shutil
import subprocess
import time

import pytest
import requests
import yaml

from ops import torchserve as serve
from ops.torchserve import free_port
from tests.conftest import ROOT, post, ready_server

PROMETHEUS_DIR = ROOT / "config" / "prometheus"
needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="Debian package 'prometheus' not installed (.ci/run installs it)")


@needs_prometheus
def test_alert_rules_pass_promtool_check_and_unit_tests():
    check = subprocess.run(["promtool", "check", "rules", "alerts.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    tests = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
    assert tests.returncode == 0 and "SUCCESS" in tests.stdout, tests.stdout + tests.stderr
    config = subprocess.run(["promtool", "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True)
    assert config.returncode == 0, config.stdout + config.stderr


def test_grafana_dashboard_uses_only_metrics_that_exist():
    import json
    import re

    dashboard = json.loads((PROMETHEUS_DIR / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    assert len(exprs) >= 8
    declared = yaml.safe_load((ROOT / "config" / "metrics.yaml").read_text())
    names = {m["name"] for group in ("ts_metrics", "model_metrics") for kind in declared[group].values() for m in kind}
    for expr in exprs:
        used = set(re.findall(r"\b(skin_lesion_[a-z_]+?|ts_[a-z_]+|Requests[245]XX)(?:_bucket|_sum|_count)?\b", expr))
        assert used and used <= names, expr


class Prometheus:
    def __init__(self, url):
        self.url = url

    def query(self, expr):
        response = requests.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10).json()
        assert response["status"] == "success", response
        return response["data"]["result"]

    def scalar(self, expr):
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None


@pytest.fixture()
def prometheus_and_server(tmp_path, release_store):
    server = ready_server(tmp_path / "ts", release_store)
    prometheus = None
    try:
        metrics_target = server.url("metrics").removeprefix("http://")
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
                  "scrape_configs": [{"job_name": "torchserve", "static_configs": [{"targets": [metrics_target]}]}]}
        (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
        port = free_port()
        prometheus = subprocess.Popen(
            ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))
        client = Prometheus(f"http://127.0.0.1:{port}")
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if client.scalar('up{job="torchserve"}') == 1.0:
                    break
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        else:
            pytest.fail(f"Prometheus never scraped TorchServe:\n{(tmp_path / 'prometheus.log').read_text()[-2000:]}")
        yield client, server
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=30)
        serve.stop(server)


@needs_prometheus
@pytest.mark.slow
@pytest.mark.data
def test_prometheus_scrapes_the_custom_metrics_with_the_right_values(prometheus_and_server, samples_dir):
    prometheus, server = prometheus_and_server
    image = (samples_dir / "ISIC_0025032.jpg").read_bytes()
    bodies = []
    for explain in [False] * 3 + [True] * 2:  # one at a time: each request is its own batch
        response = post(server, image, explain=explain, content_type=None)
        assert response.status_code == 200
        bodies.append(response.json())
    for bad in (b"", b"not an image"):
        assert post(server, bad, content_type=None).status_code >= 400
    expected = {("predict", "ok"): 3, ("explain", "ok"): 2, ("predict", "empty_body"): 1, ("predict", "invalid_image"): 1}
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        got = {(r["metric"]["Endpoint"], r["metric"]["Outcome"]): float(r["value"][1])
               for r in prometheus.query("sum by (Endpoint, Outcome) (skin_lesion_requests_total)")}
        if got == expected:
            break
        time.sleep(1)
    assert got == expected
    predicted = bodies[0]["prediction"]
    assert prometheus.scalar(f'sum(skin_lesion_predictions_total{{PredictedClass="{predicted}"}})') == 5
    assert prometheus.scalar("sum(skin_lesion_predictions_total)") == 5
    referrals = sum(body["referral"]["refer"] for body in bodies)
    assert (prometheus.scalar("sum(skin_lesion_referrals_total)") or 0) == referrals
    assert prometheus.scalar("sum(skin_lesion_top_confidence_tenths_count)") == 5
    assert prometheus.scalar("sum(skin_lesion_top_confidence_tenths_sum)") == pytest.approx(10 * sum(max(b["probabilities"].values()) for b in bodies), abs=1e-3)
    assert prometheus.scalar("sum(skin_lesion_batch_size_count)") == 7
    assert prometheus.scalar("sum(skin_lesion_batch_size_sum)") == 7
    assert prometheus.scalar("sum(skin_lesion_inference_seconds_count)") == 5
    assert prometheus.scalar("sum(skin_lesion_gradcam_seconds_count)") == 2
    assert prometheus.scalar("sum(skin_lesion_preprocess_seconds_count)") == 7
    assert prometheus.scalar("sum(skin_lesion_preprocess_seconds_sum)") > 0
    assert prometheus.scalar('sum(ts_inference_requests_total{model_name="skin_lesion"})') == 7
    rules = requests.get(f"{prometheus.url}/api/v1/rules", timeout=10).json()["data"]["groups"]
    assert {group["name"] for group in rules} == {"skin-lesion-availability", "skin-lesion-drift"}
