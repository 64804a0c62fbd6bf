"""Where the study's files live; each can be moved with an environment variable.

Read at call time (`paths.CACHE`), so tests and callers may point them elsewhere.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository: configs/study/, results/, docs/
RESULTS = Path(os.environ.get("SAT_TF_STUDY_RESULTS") or ROOT / "results" / "study")
CACHE = Path(os.environ.get("SAT_TF_CACHE", "/tmp/sat_tf_cache"))  # runs, claims, test arrays
TARBALL = Path(
    os.environ.get("SAT_TF_CIFAR10_TARBALL") or ROOT.parent / "shared/data/cifar10-jpeg.tar.gz"
)
