"""The running parts, the composition root, one room each:

- `events`: the game-event consumer and the store that applies events in SQL;
- `auth`: the account request/reply server and the relay that publishes registrations;
- `ops`: operator tools (status, dead letters, trim, backup and restore, replay, ACLs);
- `cli`: the `usermgmt` command line, its subcommands and tables;
- `sim`: the demo and the traffic simulator;
- `client`: the client library for game services (`usermgmt.Publisher`, `usermgmt.AuthClient`);
- `runtime`: what they share (settings, connections, logs, metrics, stream reads, the runner).
"""
