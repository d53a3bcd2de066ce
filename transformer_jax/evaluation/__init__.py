"""Evaluations of trained models beyond held-out loss: passkey retrieval (more with the
evaluation issue)."""
