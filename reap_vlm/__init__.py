"""REAP-VLM: prune the least important experts of Mixture-of-Experts models, vision-language first."""

__version__ = "0.1.0"
