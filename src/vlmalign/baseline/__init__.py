"""Peer baselines trained on the same data and evaluated with the same code as the VLMs."""
