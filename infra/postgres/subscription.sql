-- On the replica (service-db-replica), in the users database.
-- ${publisher} is a libpq conninfo string for the master as the replicator role.
-- The subscription is created BEFORE the database is made read-only: CREATE
-- SUBSCRIPTION is refused in a read-only transaction, while the apply worker
-- keeps writing once the default is on.
CREATE SUBSCRIPTION users_sub CONNECTION ${publisher} PUBLICATION users_pub;
ALTER DATABASE users SET default_transaction_read_only = on;
