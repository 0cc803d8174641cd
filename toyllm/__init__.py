"""toyllm: a small, fast, readable GPT-2 for learning and for real use.

Importing the package is cheap: nothing is computed, no device is chosen and no file is read until you ask.
"""

__version__ = "0.1.0"
