"""The `usermgmt` command line: the entry point, its subcommands and its tables."""
