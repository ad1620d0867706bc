"""Currencies, accounts, bonus lots, double-entry postings, reservations."""
