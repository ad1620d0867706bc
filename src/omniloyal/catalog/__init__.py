"""Legal entities, points of sale (stores, online store, app), payment methods, products, stock."""
