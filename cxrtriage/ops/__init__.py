"""What an operator runs against an installed node: pre-flight checks (``cxrtriage check``)."""
