"""One fingerprint (canonical JSON -> SHA-256, plus source files' bytes) names every cache.

The feature cache's name must not move with the helper: existing caches keep their names."""

import hashlib
import json

from covfeat.head.config import FitConfig
from covfeat.store.key import cache_key
from covfeat.use.reproduce import _fit_tag

# cache_key's value for this input, computed by the code before covfeat.core.fingerprint made it.
PINNED_CONFIG = {"backbone": "inception_v3", "augment": 4, "jitter": {"rotation": 15.0, "shift": 0.1},
                 "views": ["PA"], "weights": {"identity": "none:seed=0"}, "scaled_decode": True}
PINNED_ROWS = [{"label": 1, "patient_id": "p1", "source": "cohen", "view": "PA", "sha256": "ab" * 32},
               {"label": 0, "patient_id": "p2", "source": "kermany", "view": "PA", "sha256": "cd" * 32}]


def test_the_feature_cache_key_is_the_one_existing_caches_are_named_by():
    assert cache_key(PINNED_CONFIG, PINNED_ROWS) == "73d9a556a2a02a1b"


def test_the_fit_tag_is_the_one_earlier_reproductions_named_their_runs_by():
    fit = FitConfig()
    old = hashlib.sha256(json.dumps(fit.run_dict(), sort_keys=True).encode()).hexdigest()[:8]
    assert _fit_tag(fit) == old
