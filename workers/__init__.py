"""The consumers, the request/reply server and the command line: the composition root."""
