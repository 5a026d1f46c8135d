"""Stripe payments: checkout sessions, activation after checkout, and signed webhooks.

`gateway` talks to Stripe's API (blocking calls in worker threads, bounded by a timeout),
`plans` holds the rules that change a user's plan, `webhooks` turns verified events into those
changes exactly once per event.
"""
