"""Who is calling: app JWTs, API keys, admin credentials, and the `Principal` they resolve to."""
