-- Run in the users database of both clusters, after schema.sql.
GRANT CONNECT ON DATABASE users TO users_app, balance_check, replicator;
GRANT SELECT, INSERT, UPDATE, DELETE ON users TO users_app;
-- The publisher's walsender reads the table for the initial copy as replicator.
GRANT SELECT ON users TO replicator;

-- dbproxy's auth_query on pooled listeners ([auth] in infra/balance/dbproxy.toml):
-- a login role's secret, read through a function that runs as its owner, so that
-- the role asking (balance_check) never reads pg_authid itself (pgbouncer's advice
-- for auth_user). No superuser's secret is given out.
CREATE FUNCTION public.dbproxy_user_secret(role_name text, OUT usename text, OUT passwd text)
  RETURNS record LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS '
  SELECT rolname::text, CASE WHEN rolvaliduntil < now() THEN NULL ELSE rolpassword END
  FROM pg_authid WHERE rolname = role_name AND rolcanlogin AND NOT rolsuper
';
REVOKE ALL ON FUNCTION public.dbproxy_user_secret(text) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION public.dbproxy_user_secret(text) TO balance_check;
