"""Placeholder: the `train` subcommands land here."""
