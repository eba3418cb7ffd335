"""What a user does with a run: ``report`` (Table 2, figures, report.html), ``predict`` and
``export`` (new images, one Keras model), ``explain`` (Grad-CAM), and ``reproduce`` (the
paper in one command)."""
