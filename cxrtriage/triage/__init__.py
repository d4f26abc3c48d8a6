"""Triage: the priority model, scheduler jobs and the reading worklist."""
