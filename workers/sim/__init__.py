"""The demo (`make demo`) and the traffic simulator (`usermgmt simulate`)."""
