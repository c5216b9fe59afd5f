"""The client library for game services: publish game events, call the account API.

It depends only on `usermgmt.domain` and the key layout (`usermgmt.persistence.keys`).
"""
