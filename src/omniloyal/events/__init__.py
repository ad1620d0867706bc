"""Events: facts from the loyalty side, sites, apps and the contact centre (ingest API)."""
