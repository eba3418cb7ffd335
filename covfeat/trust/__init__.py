"""The statistics of trust, with no knowledge of the stages: classification metrics and their
intervals, near-duplicate fingerprints and pairs, the paper's published numbers and the list
of ways covfeat differs from it.  The head stage uses the metrics and the near-duplicates;
the audit and the report read all of it."""
