"""Business metrics computed in the stream (:mod:`clickpulse.metrics.business`)."""
