"""Where fanout publishes its completion events: one file per transport."""
