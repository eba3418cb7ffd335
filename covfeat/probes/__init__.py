"""The shortcut audit: probes that ask whether a run reads the hospital instead of the disease,
running stage one and stage two again where they need to (``audit``).

Each probe module registers its probes when imported, and the audit runs them (and
``audit.json`` and its summary list them) in registration order.  Importing any part of this
package runs these imports first, in this order, so the order never depends on which module
a caller happened to import first.
"""

# isort: off
from covfeat.probes import metadata  # noqa: F401
from covfeat.probes import retrain  # noqa: F401
from covfeat.probes import lungs  # noqa: F401
from covfeat.probes import source  # noqa: F401
from covfeat.probes import external  # noqa: F401
from covfeat.probes import gradcam  # noqa: F401
# isort: on
