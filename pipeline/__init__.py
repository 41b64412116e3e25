"""The distributed side of STKD: data, training runs, tracking and sweeps on Ray and MLflow (``stkd/`` holds
the method itself)."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: tune_spaces/ and studies/ live beside pipeline/
