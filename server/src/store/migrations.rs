//! The schema of both store backends, versioned in one list: version N means the same tables
//! on SQLite and on PostgreSQL, so a feature lands in both or in neither.
//!
//! Never edit a shipped entry: append. SQLite's numbering predates PostgreSQL support and is
//! kept, so existing `flotilla.db` files upgrade in place; PostgreSQL follows the same numbers.
//! PostgreSQL's dialect: BIGINT for integers (u64 bit-cast like on SQLite), BOOLEAN for flags,
//! and `COLLATE "C"` on UUID text so text order is uuid order there too (the locale's order is
//! not).

/// One schema version, in each backend's SQL.
pub(super) struct Migration {
    pub version: i64,
    pub sqlite: &'static [&'static str],
    pub postgres: &'static [&'static str],
}

/// Versioned schema changes, applied in order at open.
pub(super) const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        sqlite: &[
            "CREATE TABLE agents (
            uid TEXT PRIMARY KEY NOT NULL,
            identifying TEXT NOT NULL,
            non_identifying TEXT NOT NULL,
            capabilities INTEGER NOT NULL,
            custom_capabilities TEXT NOT NULL,
            health TEXT,
            effective_config TEXT,
            remote_config_status TEXT,
            desired_config TEXT,
            labels TEXT NOT NULL,
            transport TEXT,
            remote_addr TEXT,
            first_seen INTEGER NOT NULL,
            last_seen INTEGER NOT NULL,
            connected INTEGER NOT NULL,
            sequence_num INTEGER NOT NULL,
            heartbeat_interval_s INTEGER NOT NULL,
            previous_uid TEXT
        )",
            "CREATE TABLE batches (
            id TEXT PRIMARY KEY NOT NULL,
            query TEXT NOT NULL,
            kind TEXT NOT NULL,
            params TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            skipped TEXT NOT NULL
        )",
            "CREATE TABLE commands (
            id TEXT PRIMARY KEY NOT NULL,
            agent_uid TEXT NOT NULL,
            batch_id TEXT REFERENCES batches(id),
            kind TEXT NOT NULL,
            params TEXT NOT NULL,
            status TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            sent_at INTEGER,
            finished_at INTEGER,
            expires_at INTEGER NOT NULL,
            result TEXT,
            error TEXT,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            audit_id INTEGER
        )",
            "CREATE INDEX commands_agent_status ON commands(agent_uid, status, id)",
            "CREATE INDEX commands_status_expires ON commands(status, expires_at)",
            "CREATE INDEX commands_status_sent ON commands(status, sent_at)",
            "CREATE INDEX commands_batch ON commands(batch_id, id)",
            "CREATE TABLE audit (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            ts INTEGER NOT NULL,
            actor TEXT NOT NULL,
            channel TEXT NOT NULL,
            operation TEXT NOT NULL,
            targets TEXT NOT NULL,
            params TEXT NOT NULL,
            outcome TEXT NOT NULL,
            ref_id INTEGER,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL
        )",
            "CREATE INDEX audit_actor ON audit(actor, id)",
            "CREATE INDEX audit_operation ON audit(operation, id)",
            "CREATE INDEX audit_channel ON audit(channel, id)",
            "CREATE INDEX audit_ts ON audit(ts)",
            // Denormalised copy of audit.targets for indexed "records about agent X" queries.
            // The hash covers audit.targets only; this table is an index, not evidence.
            // CASCADE so deleting an audit row (tampering, or a future retention job) still works.
            "CREATE TABLE audit_targets (
            target TEXT NOT NULL,
            audit_id INTEGER NOT NULL REFERENCES audit(id) ON DELETE CASCADE,
            PRIMARY KEY (target, audit_id)
        ) WITHOUT ROWID",
            "CREATE INDEX audit_targets_audit ON audit_targets(audit_id)",
        ],
        postgres: PG_1,
    },
    Migration {
        version: 2,
        sqlite: &[
            // Re-registration: agents that make up a new uid on every start are linked to their
            // earlier record by `service.instance.id` + host (see `Agent::identity_key`).
            "ALTER TABLE agents ADD COLUMN identity_key TEXT",
            "ALTER TABLE agents ADD COLUMN replaces TEXT",
            "ALTER TABLE agents ADD COLUMN replaced_by TEXT",
            "CREATE INDEX agents_identity ON agents(identity_key, last_seen)",
            // Backfill exactly as `Agent::identity_key` computes it (attributes are JSON arrays
            // of [key, value], identifying ones first; host.name before hostname; empty values
            // give no key), so records from before the upgrade are candidates too.
            "UPDATE agents SET identity_key = (
                SELECT inst || char(0) || host FROM (SELECT
                    COALESCE((SELECT j.value ->> 1 FROM json_each(agents.identifying) j WHERE j.value ->> 0 = 'service.instance.id' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.non_identifying) j WHERE j.value ->> 0 = 'service.instance.id' LIMIT 1)) AS inst,
                    COALESCE((SELECT j.value ->> 1 FROM json_each(agents.identifying) j WHERE j.value ->> 0 = 'host.name' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.non_identifying) j WHERE j.value ->> 0 = 'host.name' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.identifying) j WHERE j.value ->> 0 = 'hostname' LIMIT 1), (SELECT j.value ->> 1 FROM json_each(agents.non_identifying) j WHERE j.value ->> 0 = 'hostname' LIMIT 1)) AS host)
                WHERE inst <> '' AND host <> ''
            )",
        ],
        postgres: PG_2,
    },
    Migration {
        version: 3,
        sqlite: &[
            // Liveness comes from when an agent was last heard, not from its transport: only
            // a goodbye (`agent_disconnect`) or a re-registration makes it offline at once.
            // Existing records start as not departed, so they age out like any other.
            "ALTER TABLE agents ADD COLUMN departed INTEGER NOT NULL DEFAULT 0",
        ],
        postgres: PG_3,
    },
    Migration {
        version: 4,
        sqlite: &[
            // The chat gateways' state (see `ChatStore`): bodies are the chat crate's JSON.
            "CREATE TABLE chat_confirmations (
            id TEXT PRIMARY KEY NOT NULL,
            body TEXT NOT NULL,
            expires_at INTEGER NOT NULL
        )",
            "CREATE TABLE chat_threads (
            key TEXT PRIMARY KEY NOT NULL,
            body TEXT NOT NULL,
            last_used INTEGER NOT NULL
        )",
            "CREATE INDEX chat_threads_last_used ON chat_threads(last_used)",
            "CREATE TABLE chat_deliveries (
            id TEXT PRIMARY KEY NOT NULL,
            seen_at INTEGER NOT NULL
        )",
        ],
        postgres: PG_4,
    },
    Migration {
        version: 5,
        sqlite: &[
            // Fleet-alert subscriptions of chat channels (body: the chat crate's JSON) and the
            // agents muted per subscription (the alert's Mute button).
            "CREATE TABLE chat_subscriptions (
            id TEXT PRIMARY KEY NOT NULL,
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            body TEXT NOT NULL,
            created_at INTEGER NOT NULL
        )",
            "CREATE TABLE chat_mutes (
            subscription TEXT NOT NULL,
            agent TEXT NOT NULL,
            until INTEGER NOT NULL,
            PRIMARY KEY (subscription, agent)
        ) WITHOUT ROWID",
        ],
        postgres: PG_5,
    },
    Migration {
        version: 6,
        // mTLS: the agent's client certificate (JSON: identity, subject CN, SANs, SHA-256),
        // pinned to its uid with `opamp.tls.pin_uid`.
        sqlite: &["ALTER TABLE agents ADD COLUMN client_cert TEXT"],
        postgres: &["ALTER TABLE agents ADD COLUMN client_cert TEXT"],
    },
    Migration {
        version: 7,
        sqlite: &[
            // The replica holding each agent's connection, and each replica's heartbeat, so
            // replicas sharing a database release only the agents of replicas that died.
            "ALTER TABLE agents ADD COLUMN replica TEXT",
            "CREATE TABLE replicas (
            id TEXT PRIMARY KEY NOT NULL,
            started_at INTEGER NOT NULL,
            heartbeat_at INTEGER NOT NULL,
            connections INTEGER NOT NULL
        )",
        ],
        postgres: PG_7,
    },
];

const PG_1: &[&str] = &[
    "CREATE TABLE agents (
        uid TEXT COLLATE \"C\" PRIMARY KEY NOT NULL,
        identifying TEXT NOT NULL,
        non_identifying TEXT NOT NULL,
        capabilities BIGINT NOT NULL,
        custom_capabilities TEXT NOT NULL,
        health TEXT,
        effective_config TEXT,
        remote_config_status TEXT,
        desired_config TEXT,
        labels TEXT NOT NULL,
        transport TEXT,
        remote_addr TEXT,
        first_seen BIGINT NOT NULL,
        last_seen BIGINT NOT NULL,
        connected BOOLEAN NOT NULL,
        sequence_num BIGINT NOT NULL,
        heartbeat_interval_s BIGINT NOT NULL,
        previous_uid TEXT COLLATE \"C\"
    )",
    "CREATE TABLE batches (
        id TEXT COLLATE \"C\" PRIMARY KEY NOT NULL,
        query TEXT NOT NULL,
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        actor TEXT NOT NULL,
        channel TEXT NOT NULL,
        skipped TEXT NOT NULL
    )",
    "CREATE TABLE commands (
        id TEXT COLLATE \"C\" PRIMARY KEY NOT NULL,
        agent_uid TEXT COLLATE \"C\" NOT NULL,
        batch_id TEXT COLLATE \"C\" REFERENCES batches(id),
        kind TEXT NOT NULL,
        params TEXT NOT NULL,
        status TEXT NOT NULL,
        created_at BIGINT NOT NULL,
        sent_at BIGINT,
        finished_at BIGINT,
        expires_at BIGINT NOT NULL,
        result TEXT,
        error TEXT,
        actor TEXT NOT NULL,
        channel TEXT NOT NULL,
        audit_id BIGINT
    )",
    "CREATE INDEX commands_agent_status ON commands(agent_uid, status, id)",
    "CREATE INDEX commands_status_expires ON commands(status, expires_at)",
    "CREATE INDEX commands_status_sent ON commands(status, sent_at)",
    "CREATE INDEX commands_batch ON commands(batch_id, id)",
    // Ids come from a sequence; appends are serialised (see postgres.rs), so id order is
    // chain order. A rolled-back append leaves a gap, which the chain check allows.
    "CREATE TABLE audit (
        id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        ts BIGINT NOT NULL,
        actor TEXT NOT NULL,
        channel TEXT NOT NULL,
        operation TEXT NOT NULL,
        targets TEXT NOT NULL,
        params TEXT NOT NULL,
        outcome TEXT NOT NULL,
        ref_id BIGINT,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )",
    "CREATE INDEX audit_actor ON audit(actor, id)",
    "CREATE INDEX audit_operation ON audit(operation, id)",
    "CREATE INDEX audit_channel ON audit(channel, id)",
    "CREATE INDEX audit_ts ON audit(ts)",
    "CREATE TABLE audit_targets (
        target TEXT NOT NULL,
        audit_id BIGINT NOT NULL REFERENCES audit(id) ON DELETE CASCADE,
        PRIMARY KEY (target, audit_id)
    )",
    "CREATE INDEX audit_targets_audit ON audit_targets(audit_id)",
];

// No backfill: no PostgreSQL database held agents before version 2 (every one is created at
// the latest version).
const PG_2: &[&str] = &[
    "ALTER TABLE agents ADD COLUMN identity_key TEXT",
    "ALTER TABLE agents ADD COLUMN replaces TEXT COLLATE \"C\"",
    "ALTER TABLE agents ADD COLUMN replaced_by TEXT COLLATE \"C\"",
    "CREATE INDEX agents_identity ON agents(identity_key, last_seen)",
];

const PG_3: &[&str] = &["ALTER TABLE agents ADD COLUMN departed BOOLEAN NOT NULL DEFAULT FALSE"];

const PG_4: &[&str] = &[
    "CREATE TABLE chat_confirmations (
        id TEXT PRIMARY KEY NOT NULL,
        body TEXT NOT NULL,
        expires_at BIGINT NOT NULL
    )",
    "CREATE TABLE chat_threads (
        key TEXT PRIMARY KEY NOT NULL,
        body TEXT NOT NULL,
        last_used BIGINT NOT NULL
    )",
    "CREATE INDEX chat_threads_last_used ON chat_threads(last_used)",
    "CREATE TABLE chat_deliveries (
        id TEXT PRIMARY KEY NOT NULL,
        seen_at BIGINT NOT NULL
    )",
];

const PG_5: &[&str] = &[
    "CREATE TABLE chat_subscriptions (
        id TEXT PRIMARY KEY NOT NULL,
        platform TEXT NOT NULL,
        workspace TEXT NOT NULL,
        channel TEXT NOT NULL,
        body TEXT NOT NULL,
        created_at BIGINT NOT NULL
    )",
    "CREATE TABLE chat_mutes (
        subscription TEXT NOT NULL,
        agent TEXT NOT NULL,
        until BIGINT NOT NULL,
        PRIMARY KEY (subscription, agent)
    )",
];

const PG_7: &[&str] = &[
    "ALTER TABLE agents ADD COLUMN replica TEXT",
    "CREATE INDEX agents_replica ON agents(replica) WHERE connected",
    "CREATE TABLE replicas (
        id TEXT PRIMARY KEY NOT NULL,
        started_at BIGINT NOT NULL,
        heartbeat_at BIGINT NOT NULL,
        connections BIGINT NOT NULL
    )",
];

/// The newest schema version.
pub(super) fn latest() -> i64 {
    MIGRATIONS.last().map(|m| m.version).unwrap_or(0)
}
