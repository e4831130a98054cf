"""Continued pretraining: the data blend, its task on the shared loop, and recipes."""
