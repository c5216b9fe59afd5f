"""Pure domain: schemas, rules and ranking. No Redis, no SQL, no logging setup."""
