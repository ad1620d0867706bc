"""The POS API: calculate, confirm, cancel, refund, balance, offline cheques."""
