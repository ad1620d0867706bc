"""The small shared vocabulary: errors, money, clock, pagination."""
