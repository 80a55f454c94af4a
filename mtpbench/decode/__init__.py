"""Decoders: the autoregressive baseline and the reference MTP speculative decoder."""

from .ar import generate_ar
from .records import DecodeResult, StepRecord, TokenRecord
from .rule import EXACT, Rule
from .speculative import MAX_K, generate_mtp

__all__ = ["DecodeResult", "EXACT", "MAX_K", "Rule", "StepRecord", "TokenRecord", "generate_ar", "generate_mtp"]
