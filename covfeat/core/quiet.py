"""A quiet start: TensorFlow and Keras imported without their start-up lines on stderr.

TensorFlow's C++ libraries print oneDNN and CPU-feature notices through absl before any
Python setting can reach them (``TF_CPP_MIN_LOG_LEVEL`` no longer silences them), twice.
:func:`import_tensorflow` imports TensorFlow and Keras with the process's stderr (file
descriptor 2) sent to a temporary file, then writes back every captured line that is not
one of those notices, so real errors still reach the user.

The ``tensorflow`` wheel (a CUDA build, the one Linux installs) adds two more on a machine
without a CUDA driver: "Could not find cuda drivers" at import, and "failed call to cuInit"
at the first device query, which :func:`import_tensorflow` therefore makes while stderr is
captured. The cuInit line is dropped only beside the no-driver line: on a node whose driver
is there but fails, it is a real error and stays.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile

NOISE = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|I\d{4} .*(port\.cc|cpu_feature_guard\.cc).*"
    r"|To enable the following instructions: .*rebuild TensorFlow with the appropriate compiler flags\."
    r"|.*oneDNN custom operations are on.*"
    r"|I\d{4} .*cudart_stub\.cc.*Could not find cuda drivers on your machine, GPU will not be used\.)$")
NO_DRIVER = re.compile(r"^I\d{4} .*cudart_stub\.cc.*Could not find cuda drivers")
CUINIT = re.compile(r"^E\d{4} .*failed call to cuInit: .*$")


_done = False


def import_tensorflow() -> None:
    """Import tensorflow and keras once, dropping only their known start-up notices."""
    global _done
    if _done or "tensorflow" in sys.modules:
        _done = True
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, captured): nothing to filter
        import keras  # noqa: F401
        import tensorflow  # noqa: F401

        _done = True
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), fd)
        try:
            import keras  # noqa: F401
            import tensorflow

            tensorflow.config.list_physical_devices()  # a CUDA build's driver probe, printed here
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines()
            no_driver = any(NO_DRIVER.match(ln) for ln in lines)
            kept = [ln for ln in lines if ln and not NOISE.match(ln) and not (no_driver and CUINIT.match(ln))]
            if kept:
                print("\n".join(kept), file=sys.stderr)
    _done = True


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
