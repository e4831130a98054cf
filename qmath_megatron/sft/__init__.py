"""Supervised fine-tuning: data preparation (incl. RFT), the packed dataset, its task and
recipes."""
