"""Frozen pre-training: staged training that adds speech to the split model while the text model stays intact."""
