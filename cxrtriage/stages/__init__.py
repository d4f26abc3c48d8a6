"""The node's work stages, one module each, run by the lease loop.

* :mod:`.lease_loop`: claim a job of one kind, run a stage on it, record
  failure with backoff or for good, discard the work of a lost lease;
* :mod:`.score`: score a received image (the scorer is passed in), store the
  SEG and SR durably, catalog them, queue their sends, record the result;
* :mod:`.send`: C-STORE one stored SEG or SR to one destination, as stored;
* :mod:`.circuit`: a circuit breaker per destination; each destination has
  its own send workers, which claim nothing while its circuit is open.

The task between stages is a job row: ingest queues a ``score`` job for
each image, the score stage a ``send`` job per result object and
destination. Every stage takes its dependencies in its constructor and is
called with the claimed job and the worker holding its lease, so each one
runs in a test with a real database and archive and no node around it.
"""
