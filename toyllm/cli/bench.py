"""Placeholder: the `bench` subcommands land here."""
