"""Ktulhu: a self-hosted conversational LLM server on trio."""

__version__ = "0.1.0"
