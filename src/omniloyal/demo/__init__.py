"""The demo retailer: stores, catalogue, members, the seed offers and a year of purchases."""

from omniloyal.demo.retailer import DemoSummary, generate

__all__ = ["DemoSummary", "generate"]
