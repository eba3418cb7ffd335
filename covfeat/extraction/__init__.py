"""Stage one, extraction: from image files to feature maps in the store.  Settings (``config``), where
images come from (``sources``), how they are decoded and jittered (``images``), the backbone
registry (``backbones``) and its traced-graph cache (``graphfile``), the plan of a run
(``plan``), the per-shard work every driver shares (``work``), and the drivers: local
(``run``), Ray (``ray_driver``) and ``--shard i/N`` slices (``run``)."""
