"""Tests here run only in the TensorFlow environment that ``run.sh`` builds.

The main suite collects ``tests/`` without TensorFlow, where these tests cannot run, so they
are left out of collection unless ``GF_TF_ENV=tensorflow``.
"""

import os

collect_ignore_glob = [] if os.environ.get("GF_TF_ENV") == "tensorflow" else ["test_*.py"]
