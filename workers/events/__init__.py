"""Game events: the consumer that reads the event streams and the store that applies them."""
