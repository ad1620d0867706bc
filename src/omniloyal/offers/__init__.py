"""Offers: event + filters + actions, the pure engine, limits and counters."""
