"""Accounts: the request/reply server and the relay that publishes registrations."""
