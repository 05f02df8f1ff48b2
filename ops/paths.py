"""Where the project's files are: the one place that spells out default paths."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_NAME = "skin_lesion"
CHECKPOINT = ROOT / "models" / "skin_lesion.pt"
MODEL_CONFIG = ROOT / "config" / "model-config.yaml"
SERVER_CONFIG = ROOT / "config" / "config.properties"
METRICS_CONFIG = ROOT / "config" / "metrics.yaml"
MODEL_STORE = ROOT / "model_store"
RUN_DIR = ROOT / "run"
GOLDEN_SMOKE = ROOT / "models" / "golden_smoke.json"
PROVENANCE = ROOT / "models" / "provenance"
VAL_SPLIT = PROVENANCE / "val_split.json"
# The real data (read in place, never copied into the repository); SKIN_LESION_DATA overrides.
DATA = Path(os.environ.get("SKIN_LESION_DATA", ROOT.parent / "shared" / "data"))
