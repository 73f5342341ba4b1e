"""The identity service: users, passwords, tokens, JWKS, and the guards other services use."""
