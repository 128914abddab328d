"""cdd-ray."""
