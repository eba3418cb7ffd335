"""Stage two: from cached feature maps to a trained head and a run folder.  Settings
(``config``), the split (``split``), SMOTE and class weights (``balance``), the head's Keras
definition and numpy twin (``model``), its Keras template (``template``), the compiled
dropout + pooling pass (``dropout``) and batch steps (``kernels``), the training loop
(``loop``), fit-head and cross-validation (``fit``), and the run folder (``runs``)."""
