"""The analytical warehouse (DuckDB | ClickHouse), its event sink, member features and profiles."""
