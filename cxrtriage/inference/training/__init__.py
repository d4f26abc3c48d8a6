"""Model development: training the two pipeline stages (``cxrtriage train``), held-out evaluation, metrics.

The node never imports this package (tests/test_architecture.py); the runtime
(reading radiographs, models, pipeline, scoring, DICOM writers) lives in
:mod:`cxrtriage.inference` itself. The phantom generator stays there: the node
scores one phantom at warm-up and ``cxrtriage demo`` sends them.
"""
