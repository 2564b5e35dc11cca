"""Run reports: the self-contained HTML page of a run (``clickpulse report html``)."""
