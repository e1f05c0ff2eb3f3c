"""fedfusion command-line entry point."""
