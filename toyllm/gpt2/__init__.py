"""GPT-2: config, model and Hugging Face compatible weights."""

from toyllm.gpt2.config import GPT2Config
from toyllm.gpt2.model import CausalLMOutput, GPT2LMHeadModel

__all__ = ["CausalLMOutput", "GPT2Config", "GPT2LMHeadModel"]
