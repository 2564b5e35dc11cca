"""Engagement scoring of a user's sessions (:mod:`clickpulse.features.engagement`); the model
feature vector built from a user's state is :mod:`clickpulse.models.features`."""
