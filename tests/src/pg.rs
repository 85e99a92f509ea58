//! A PostgreSQL schema per test in the machine's database (`FLOTILLA_TEST_PG_URL`, default
//! `postgres://root@127.0.0.1:5432/test`), shared by the store tests and the server tests.

use sqlx::Connection;
use uuid::Uuid;

/// The machine's PostgreSQL, as the tests reach it.
pub fn pg_url() -> String {
    std::env::var("FLOTILLA_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/test".into())
}

/// A schema of its own in the test database, dropped when this is dropped (also when the test
/// panicked), so parallel tests and runs share nothing.
pub struct PgSchema {
    pub name: String,
    /// A store URL that puts everything in this schema.
    pub url: String,
}

impl PgSchema {
    pub async fn create() -> PgSchema {
        let base = pg_url();
        let name = format!("flotilla_{}", Uuid::new_v4().simple());
        let mut admin = sqlx::PgConnection::connect(&base)
            .await
            .unwrap_or_else(|e| {
                panic!("PostgreSQL at {base} is required by the PostgreSQL tests: {e}")
            });
        sqlx::query(&format!("CREATE SCHEMA {name}"))
            .execute(&mut admin)
            .await
            .unwrap();
        admin.close().await.unwrap();
        let sep = if base.contains('?') { '&' } else { '?' };
        let url = format!("{base}{sep}options=-c%20search_path%3D{name}");
        PgSchema { name, url }
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (base, name) = (pg_url(), self.name.clone());
        // Drop runs inside the test's runtime, which cannot be blocked on: use another.
        let dropped = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    let mut admin = sqlx::PgConnection::connect(&base).await?;
                    sqlx::query(&format!("DROP SCHEMA IF EXISTS {name} CASCADE"))
                        .execute(&mut admin)
                        .await?;
                    admin.close().await
                })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) && !std::thread::panicking() {
            panic!("could not drop test schema {}: {dropped:?}", self.name);
        }
    }
}
