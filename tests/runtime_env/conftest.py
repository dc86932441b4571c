"""Tests here run only in the tflite-runtime environment that ``run.sh`` builds.

The main suite collects ``tests/`` with numpy 2 and ai-edge-litert, where these tests cannot
mean anything, so they are left out of collection unless ``GF_RUNTIME_ENV=tflite-runtime``.
"""

import os

collect_ignore_glob = [] if os.environ.get("GF_RUNTIME_ENV") == "tflite-runtime" else ["test_*.py"]
