"""What every worker shares: settings, connections, logs, metrics, stream reads, the runner."""
