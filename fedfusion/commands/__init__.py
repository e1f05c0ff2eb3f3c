"""One module per fedfusion subcommand, each exposing ``command``."""
