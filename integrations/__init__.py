"""Integrations with the frameworks people already train with (Lightning, Transformers, ...)."""
