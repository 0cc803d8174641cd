"""The `toyllm` command: a thin layer over the library API."""
