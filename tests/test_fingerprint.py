"""One fingerprint (canonical JSON -> SHA-256, plus source files' bytes) names every cache.

The feature cache's name must not move with the helper: it is the hash the code computed before
the helper existed, of the same payload."""

import hashlib
import json

from covfeat.head.config import FitConfig
from covfeat.store.key import cache_key
from covfeat.use.reproduce import _fit_tag

# An input whose key is computed below the way the code did before covfeat.core.fingerprint made it
# (its value was 73d9a556a2a02a1b until format 4 and the near-duplicate fingerprint's version entered
# the payload: issue 16 changed what a shard holds, so older caches must not be reused).
PINNED_CONFIG = {"backbone": "inception_v3", "augment": 4, "jitter": {"rotation": 15.0, "shift": 0.1},
                 "views": ["PA"], "weights": {"identity": "none:seed=0"}, "scaled_decode": True}
PINNED_ROWS = [{"label": 1, "patient_id": "p1", "source": "cohen", "view": "PA", "sha256": "ab" * 32},
               {"label": 0, "patient_id": "p2", "source": "kermany", "view": "PA", "sha256": "cd" * 32}]


def test_the_feature_cache_key_is_the_one_existing_caches_are_named_by():
    from covfeat.store.key import FORMAT_VERSION
    from covfeat.trust.neardup import FINGERPRINT_VERSION

    payload = {"format": FORMAT_VERSION, "config": PINNED_CONFIG, "data": PINNED_ROWS,
               "near_duplicate_fingerprint": FINGERPRINT_VERSION}
    old_way = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert cache_key(PINNED_CONFIG, PINNED_ROWS) == old_way == "2c4bd8d171e9d137"


def test_the_fit_tag_is_the_one_earlier_reproductions_named_their_runs_by():
    fit = FitConfig()
    old = hashlib.sha256(json.dumps(fit.run_dict(), sort_keys=True).encode()).hexdigest()[:8]
    assert _fit_tag(fit) == old
