"""The seed project's benchmark scripts, kept working from a checkout (`python toyllm/cli/benchmark/<script>.py`)."""
