-- The console's PostgreSQL role (team mode). Run once as the database owner, after the first
-- `recon-console` start as that owner has created the tables:
--   psql "postgresql://owner@host/recon" -f services/storage/postgres_roles.sql
-- then give each operator a login in recon_console (CREATE ROLE alice LOGIN IN ROLE
-- recon_console) and a password in their credentials file or ~/.pgpass.
--
-- History only grows: the audit trail and the consent revocations can be read and added to,
-- never changed, deleted or truncated (the tables' triggers refuse that too, even to the owner).

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'recon_console') THEN
        CREATE ROLE recon_console NOLOGIN;
    END IF;
END $$;

REVOKE ALL ON ALL TABLES IN SCHEMA public FROM recon_console;
GRANT USAGE ON SCHEMA public TO recon_console;

-- History: read and append, nothing else.
GRANT SELECT, INSERT ON audit, consent_revocations, consents TO recon_console;
-- The audit chain's head row, moved by every append in the same transaction.
GRANT SELECT, UPDATE ON audit_head TO recon_console;
-- Working state: discovered orders, batches, intents, leases, reminders.
GRANT SELECT, INSERT, UPDATE, DELETE ON merchants, orders, order_marks, order_sync,
    backlog_history, batches, intents, leases, reminder_outbox, reminder_opt_outs, approvals,
    operator_sessions TO recon_console;
-- The change counter other consoles watch: bumped by triggers in the writer's transaction.
GRANT SELECT, UPDATE ON change_counter TO recon_console;
GRANT SELECT ON schema_migrations TO recon_console;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO recon_console;
