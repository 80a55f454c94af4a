"""HTML comparison reports and model-card tables, built from parquet results only (never mlx or the decoder)."""

from .card import render_card
from .html import render_report

__all__ = ["render_card", "render_report"]
