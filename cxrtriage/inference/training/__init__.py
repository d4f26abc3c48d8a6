"""Training of the two pipeline stages (``cxrtriage train lungs|disease``)."""
