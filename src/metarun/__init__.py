"""metarun: a config-driven experiment runner for meta-learning research."""

__version__ = "0.1.0"
