"""The OpenAI-compatible HTTP shim (issue 6)."""
