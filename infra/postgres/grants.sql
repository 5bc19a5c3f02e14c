-- Run in the users database of both clusters, after schema.sql.
GRANT CONNECT ON DATABASE users TO users_app, balance_check, replicator;
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO users_app;
-- The publisher's walsender reads the table for the initial copy as replicator.
GRANT SELECT ON users TO replicator;
