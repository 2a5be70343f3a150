//! Several statements sent to SQLite in one round trip.
//!
//! sqlx runs each SQLite connection on a worker thread of its own, so every
//! statement awaited on its own is a round trip between threads: about 50 µs
//! on a 2-core VM, against about 5 µs to run the same statement as part of a
//! multi-statement query (`renewd bench`, "renewal throughput"). A renewal's
//! writes were a dozen round trips each, all while holding the single
//! writer. A [`Script`] collects the statements of one write with their
//! arguments and sends them together; statements that must find something
//! (a lease, a row to update) end in `RETURNING '<tag>' AS tag`, and the
//! caller checks which tags came back before releasing the savepoint.

use sqlx::sqlite::{SqliteArguments, SqliteRow};
use sqlx::{Arguments, Row, SqliteConnection};

use crate::store::{StoreError, StoreResult};

/// One bound value.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Int(Option<i64>),
    Text(Option<String>),
}

impl From<i64> for Arg {
    fn from(v: i64) -> Arg {
        Arg::Int(Some(v))
    }
}

impl From<Option<i64>> for Arg {
    fn from(v: Option<i64>) -> Arg {
        Arg::Int(v)
    }
}

impl From<i32> for Arg {
    fn from(v: i32) -> Arg {
        Arg::Int(Some(i64::from(v)))
    }
}

impl From<u32> for Arg {
    fn from(v: u32) -> Arg {
        Arg::Int(Some(i64::from(v)))
    }
}

impl From<bool> for Arg {
    fn from(v: bool) -> Arg {
        Arg::Int(Some(i64::from(v)))
    }
}

impl From<&str> for Arg {
    fn from(v: &str) -> Arg {
        Arg::Text(Some(v.to_string()))
    }
}

impl From<String> for Arg {
    fn from(v: String) -> Arg {
        Arg::Text(Some(v))
    }
}

impl From<&String> for Arg {
    fn from(v: &String) -> Arg {
        Arg::Text(Some(v.clone()))
    }
}

impl From<Option<String>> for Arg {
    fn from(v: Option<String>) -> Arg {
        Arg::Text(v)
    }
}

impl From<&Option<String>> for Arg {
    fn from(v: &Option<String>) -> Arg {
        Arg::Text(v.clone())
    }
}

impl From<Option<&str>> for Arg {
    fn from(v: Option<&str>) -> Arg {
        Arg::Text(v.map(str::to_string))
    }
}

/// The statements of one write, in order, with their `?` arguments in order.
#[derive(Debug, Default)]
pub(crate) struct Script {
    sql: String,
    args: Vec<Arg>,
    /// Not kept in the connection's statement cache: its text is one of a
    /// kind (a batch), and a cached batch of hundreds of statements holds
    /// their prepared forms for as long as it stays cached.
    one_off: bool,
}

impl Script {
    /// Appends one statement (without its `;`) and the values of its `?`s.
    pub(crate) fn push(&mut self, statement: &str, args: impl IntoIterator<Item = Arg>) {
        self.sql.push_str(statement);
        self.sql.push_str(";\n");
        self.args.extend(args);
    }

    /// Appends SQL to the statement being written, without ending it.
    pub(crate) fn fragment(&mut self, sql: &str, args: impl IntoIterator<Item = Arg>) {
        self.sql.push_str(sql);
        self.args.extend(args);
    }

    /// A script whose text is unlikely to recur (see `one_off`).
    pub(crate) fn one_off() -> Script {
        Script {
            one_off: true,
            ..Script::default()
        }
    }

    /// Puts fixed SQL (statements without `?`) in front of the script.
    pub(crate) fn prepend(&mut self, sql: &str) {
        debug_assert!(!sql.contains('?'));
        self.sql.insert_str(0, ";\n");
        self.sql.insert_str(0, sql);
    }

    /// Ends the statement written with [`Script::fragment`].
    pub(crate) fn end(&mut self) {
        self.sql.push_str(";\n");
    }

    /// Runs every statement in one round trip; returns the rows of all of
    /// them, in statement order.
    pub(crate) async fn run(self, conn: &mut SqliteConnection) -> StoreResult<Tagged> {
        if self.sql.is_empty() {
            return Ok(Tagged(Vec::new()));
        }
        // sqlx hands each `?` the next argument across the statements, so a
        // statement short of one would shift every later value: count them
        // (no statement here has a `?` inside a string literal).
        debug_assert_eq!(
            self.sql.matches('?').count(),
            self.args.len(),
            "placeholders and arguments differ in: {}",
            self.sql
        );
        let mut args = SqliteArguments::default();
        for a in self.args {
            let added = match a {
                Arg::Int(v) => args.add(v),
                Arg::Text(v) => args.add(v),
            };
            added.map_err(|e| StoreError::Corrupt(format!("cannot bind a value: {e}")))?;
        }
        let rows = sqlx::query_with(&self.sql, args)
            .persistent(!self.one_off)
            .fetch_all(conn)
            .await?;
        Ok(Tagged(rows))
    }
}

/// The rows a script returned; each starts with its statement's `tag`.
pub(crate) struct Tagged(Vec<SqliteRow>);

impl Tagged {
    /// The rows of the statements tagged `tag`.
    pub(crate) fn rows<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a SqliteRow> + 'a {
        self.0.iter().filter(move |r| tagged(r, tag))
    }

    pub(crate) fn first(&self, tag: &str) -> Option<&SqliteRow> {
        self.0.iter().find(|r| tagged(r, tag))
    }

    pub(crate) fn has(&self, tag: &str) -> bool {
        self.first(tag).is_some()
    }

    pub(crate) fn count(&self, tag: &str) -> usize {
        self.rows(tag).count()
    }
}

/// Whether a row came from a statement tagged `tag`.
fn tagged(row: &SqliteRow, tag: &str) -> bool {
    row.try_get::<&str, _>("tag").is_ok_and(|t| t == tag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    #[tokio::test]
    async fn statements_run_in_order_with_their_arguments_and_tagged_rows() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let mut s = Script::default();
        s.push(
            "CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, n INTEGER)",
            [],
        );
        // One statement built from fragments, as a multi-row INSERT is.
        s.fragment(
            "INSERT INTO t (id, name, n) VALUES (?, ?, ?)",
            [1.into(), "one".into(), None::<i64>.into()],
        );
        s.fragment(
            ", (?, ?, ?)",
            [2.into(), Some("two".to_string()).into(), 7.into()],
        );
        s.end();
        s.push(
            "UPDATE t SET n = ? WHERE id = ? RETURNING 'updated' AS tag, id",
            [5.into(), 1.into()],
        );
        s.push(
            "UPDATE t SET n = 0 WHERE id = ? RETURNING 'missing' AS tag",
            [99.into()],
        );
        s.push("SELECT 'row' AS tag, name, n FROM t ORDER BY id", []);
        let out = s.run(&mut conn).await.unwrap();
        assert_eq!(out.count("updated"), 1);
        assert!(!out.has("missing"));
        let rows: Vec<(String, i64)> = out
            .rows("row")
            .map(|r| (r.get("name"), r.get("n")))
            .collect();
        assert_eq!(rows, vec![("one".into(), 5), ("two".into(), 7)]);
    }

    #[tokio::test]
    async fn a_failing_statement_fails_the_script() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let mut s = Script::default();
        s.push("CREATE TABLE t (id INTEGER PRIMARY KEY)", []);
        s.push("INSERT INTO t (id) VALUES (?)", [1.into()]);
        s.push("INSERT INTO t (id) VALUES (?)", [1.into()]);
        assert!(s.run(&mut conn).await.is_err());
    }
}
