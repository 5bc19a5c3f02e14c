#!/usr/bin/env bash
# Init script of the postgres image (/docker-entrypoint-initdb.d/) for both
# clusters of docker-compose-balance.yml: the same SQL files the local stack
# runs (stack/control.py), with its ${name} placeholders passed to psql as
# variables, so a password is quoted by psql and never spliced into SQL text.
#   BALANCE_ROLE=master   roles, schema, publication
#   BALANCE_ROLE=replica  roles, schema, then a subscription to the master
set -euo pipefail

sql_dir=${BALANCE_SQL_DIR:-/balance/postgres}
master_host=${BALANCE_MASTER_HOST:-service-db}
master_port=${BALANCE_MASTER_PORT:-5432}
psql_base=(psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --no-password)

conninfo_quote() {  # a libpq conninfo value: in single quotes, \ and ' escaped
    local v=${1//\\/\\\\}
    v=${v//\'/\\\'}
    printf "'%s'" "$v"
}

run_sql() {  # run_sql DATABASE FILE: a file of infra/postgres with ${x} as :'x'
    sed -E "s/\\$\\{([a-z_]+)\\}/:'\\1'/g" "$sql_dir/$2" | "${psql_base[@]}" --dbname "$1" \
        -v app_password="$BALANCE_APP_PASSWORD" \
        -v check_password="$BALANCE_CHECK_PASSWORD" \
        -v replication_password="$BALANCE_REPLICATION_PASSWORD" \
        -v publisher="host=$master_host port=$master_port dbname=users user=replicator password=$(conninfo_quote "$BALANCE_REPLICATION_PASSWORD")"
}

run_sql postgres roles.sql
"${psql_base[@]}" --dbname postgres -c "CREATE DATABASE users"
run_sql users schema.sql
run_sql users grants.sql

# HAProxy's pgsql-check cannot answer SCRAM; it passes on any authentication
# request. This line asks its user for a password (never sent) on a database
# that does not exist, so nothing can log in through it (see stack/postgres.py).
sed -i '1i host balance_check balance_check all password' "$PGDATA/pg_hba.conf"

case "$BALANCE_ROLE" in
    master)
        run_sql users publication.sql
        ;;
    replica)
        # compose starts the replica once the master is healthy; wait anyway,
        # so the subscription's first connection does not race a restart.
        until pg_isready --host "$master_host" --port "$master_port" --quiet; do sleep 1; done
        run_sql users subscription.sql
        ;;
    *)
        echo "BALANCE_ROLE must be master or replica, got '$BALANCE_ROLE'" >&2
        exit 1
        ;;
esac
