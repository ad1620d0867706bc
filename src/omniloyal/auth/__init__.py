"""API keys, roles and scopes, and the audit log of admin changes."""
