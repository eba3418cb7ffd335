"""The shortcut audit: probes that ask whether a run reads the hospital instead of the disease,
running stage one and stage two again where they need to (``audit``)."""
