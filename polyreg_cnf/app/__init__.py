"""The application: run configuration, presets, the one builder, logging, reports."""
