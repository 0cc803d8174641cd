"""Placeholder: the `generate` subcommands land here."""
