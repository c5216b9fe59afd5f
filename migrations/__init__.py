"""Alembic migrations, shipped inside the distribution so `usermgmt migrate` works anywhere."""
