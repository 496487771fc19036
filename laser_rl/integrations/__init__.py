"""Integrations of the selector into training frameworks (each imports its framework lazily)."""
