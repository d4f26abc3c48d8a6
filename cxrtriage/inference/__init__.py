"""The AI: reading radiographs, the two models, the pipeline, zone scoring and the DICOM writers.

Runtime modules (what the node imports): ``radiograph`` and ``preprocess``
(pixels), ``models``, ``predictors``, ``presets``, ``registry`` and
``model_cache`` (weights), ``pipeline`` and ``parallel``, ``scoring`` (pure
numpy), ``result_model`` and ``identity`` (the typed result and the model
card shown with it), ``dicom_results``, ``overlay`` and ``score_files``
(outputs), ``phantom`` (synthetic radiographs: warm-up and the demo).

Model development lives in :mod:`cxrtriage.inference.training` (training,
held-out evaluation, metrics); the node never imports it.
"""
