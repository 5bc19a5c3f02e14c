-- Roles of the local stack, the same on both clusters.
-- ${...} placeholders are filled by stack (string.Template) from its settings.
--   users_app      the service; password login (scram-sha-256)
--   balance_check  the proxies' health checks: read role, recovery state and lag
--   replicator     the subscription's connection to the publisher

CREATE ROLE users_app LOGIN PASSWORD ${app_password};
CREATE ROLE balance_check LOGIN PASSWORD ${check_password} IN ROLE pg_monitor;
CREATE ROLE replicator LOGIN REPLICATION PASSWORD ${replication_password};
