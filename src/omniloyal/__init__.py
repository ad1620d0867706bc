"""Omniloyal: omnichannel loyalty and marketing automation for retailers."""

__version__ = "0.1.0"
