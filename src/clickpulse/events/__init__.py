"""The event contract: parsing, validation, normalization and de-duplication keys."""
