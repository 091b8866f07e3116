"""Integrations with evaluation frameworks (each imports its framework; `import dymu` never does)."""
