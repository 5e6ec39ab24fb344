"""Models: the classic GloVe classifier (`lorakit.models.classic`) and transformers loaders."""
