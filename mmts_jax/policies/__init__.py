"""Temperature (or margin) policies that carry dataset-sized state (see each module)."""
