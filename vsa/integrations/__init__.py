"""Integrations of vsa's sparse attention with other libraries (optional dependencies, imported
lazily): `vsa.integrations.diffusers` runs diffusers' Wan and Flux transformers with VSA or a GRAT
pattern on their video / image tokens."""
