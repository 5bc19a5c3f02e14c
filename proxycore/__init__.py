"""What lb and dbproxy share: servers and their health, balancing, checks,
back-pressure, the admin app, configuration primitives and process lifecycle."""
