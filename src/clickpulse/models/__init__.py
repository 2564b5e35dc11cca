"""Online models (River): pipelines, the model wrapper, progressive validation."""
