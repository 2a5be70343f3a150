//! The statements of one write, run together on the write connection.
//!
//! A [`Script`] collects the statements of one write with their arguments
//! and runs them in one go, on the thread that holds the write connection
//! (`raw`): awaited one at a time through sqlx, each would be a round trip
//! to sqlx's worker thread (about 50 µs on a 2-core VM, against about 5 µs
//! of SQLite's own work). Statements that must find something (a lease, a
//! row to update) end in `RETURNING '<tag>' AS tag`, and the caller checks
//! which tags came back before releasing the savepoint.

use super::raw::{Held, RawRow};

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
/// Its text is kept prepared on the write connection, so a script's text
/// should recur: values go in as arguments, and a batch of like writes is
/// a script per write run in one transaction (a text of its own every time
/// was prepared anew: renewd bench, "time travel").
#[derive(Debug, Default)]
pub(crate) struct Script {
    sql: String,
    args: Vec<Arg>,
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

    /// Each `?` takes the next argument across the statements, so a
    /// statement short of one would shift every later value: count them
    /// (no statement here has a `?` inside a string literal).
    fn debug_check_placeholders(&self) {
        debug_assert_eq!(
            self.sql.matches('?').count(),
            self.args.len(),
            "placeholders and arguments differ in: {}",
            self.sql
        );
    }

    /// Runs every statement on a held connection, in order; returns the
    /// rows of all of them, in statement order. The statements stay
    /// prepared for the next run of the same text.
    pub(super) fn run_db(&self, held: &mut Held) -> Result<Tagged, sqlx::Error> {
        if self.sql.is_empty() {
            return Ok(Tagged(Vec::new()));
        }
        self.debug_check_placeholders();
        Ok(Tagged(held.run(&self.sql, &self.args, true)?))
    }
}

/// The rows a script returned; each starts with its statement's `tag`.
pub(crate) struct Tagged(Vec<RawRow>);

impl Tagged {
    /// The rows of the statements tagged `tag`.
    pub(crate) fn rows<'a>(&'a self, tag: &'a str) -> impl Iterator<Item = &'a RawRow> + 'a {
        self.0.iter().filter(move |r| r.is_text("tag", tag))
    }

    /// Every row, tagged or not, in statement order.
    pub(crate) fn all(&self) -> &[RawRow] {
        &self.0
    }

    pub(crate) fn first(&self, tag: &str) -> Option<&RawRow> {
        self.0.iter().find(|r| r.is_text("tag", tag))
    }

    pub(crate) fn has(&self, tag: &str) -> bool {
        self.first(tag).is_some()
    }

    pub(crate) fn count(&self, tag: &str) -> usize {
        self.rows(tag).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::raw::Cols;
    use sqlx::{Connection, SqliteConnection};

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
        // SAFETY: `held` is dropped before `conn` is used again.
        let mut held = unsafe { Held::take(&mut conn) }.await.unwrap();
        let out = s.run_db(&mut held).unwrap();
        assert_eq!(out.count("updated"), 1);
        assert!(!out.has("missing"));
        let rows: Vec<(String, i64)> = out
            .rows("row")
            .map(|r| (r.col("name").unwrap(), r.col("n").unwrap()))
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
        // SAFETY: `held` is dropped before `conn` is used again.
        let mut held = unsafe { Held::take(&mut conn) }.await.unwrap();
        // Reported as sqlx reports SQLite's errors, constraint kind included.
        match s.run_db(&mut held) {
            Err(sqlx::Error::Database(e)) => {
                assert!(e.is_unique_violation(), "{e}");
                assert!(e.message().contains("UNIQUE"), "{e}");
            }
            other => panic!("not a database error: {:?}", other.map(|_| ())),
        }
        // The statements before the failing one ran; the handle goes back
        // to sqlx, which sees them.
        drop(held);
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, 1);
    }

    #[tokio::test]
    async fn a_kept_script_runs_again_with_new_values() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        // SAFETY: `held` is dropped before `conn` is used again.
        let mut held = unsafe { Held::take(&mut conn) }.await.unwrap();
        let mut s = Script::default();
        s.push("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT)", []);
        s.run_db(&mut held).unwrap();
        for (id, name) in [(1, Some("one")), (2, None)] {
            let mut s = Script::default();
            s.push(
                "INSERT INTO t (id, name) VALUES (?, ?) RETURNING 'in' AS tag, id, name",
                [id.into(), name.into()],
            );
            let out = s.run_db(&mut held).unwrap();
            let row = out.first("in").unwrap();
            assert_eq!(row.col::<i64>("id").unwrap(), id);
            assert_eq!(row.col::<Option<String>>("name").unwrap().as_deref(), name);
        }
        assert_eq!(held.kept(), 2, "the CREATE and the INSERT");
        // Given back, sqlx can use (and close) the connection: every kept
        // statement was finalized.
        drop(held);
        conn.close().await.unwrap();
    }

    #[tokio::test]
    async fn numbered_or_named_placeholders_are_refused() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        // SAFETY: `held` is dropped before `conn` is used again.
        let mut held = unsafe { Held::take(&mut conn) }.await.unwrap();
        for sql in [
            "SELECT 'x' AS tag, ?1 AS v",
            "SELECT 'x' AS tag, :v AS v, ? AS w",
        ] {
            let mut s = Script::default();
            s.push(sql, [1.into()]);
            let err = s.run_db(&mut held).map(|_| ()).unwrap_err();
            assert!(err.to_string().contains("anonymous"), "{sql}: {err}");
        }
        let mut s = Script::default();
        s.push("SELECT 'x' AS tag, ? AS v", [1.into()]);
        assert_eq!(s.run_db(&mut held).unwrap().count("x"), 1);
    }

    #[tokio::test]
    async fn past_the_kept_limit_the_kept_statements_start_over() {
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        // SAFETY: `held` is dropped before `conn` is used again.
        let mut held = unsafe { Held::take(&mut conn) }.await.unwrap();
        let limit = crate::store::sqlite::raw::KEPT;
        for i in 0..limit {
            let mut s = Script::default();
            s.push(&format!("SELECT 'n' AS tag, {i} AS n"), []);
            s.run_db(&mut held).unwrap();
        }
        assert_eq!(held.kept(), limit);
        let mut s = Script::default();
        s.push("SELECT 'n' AS tag, -1 AS n", []);
        let out = s.run_db(&mut held).unwrap();
        assert_eq!(out.first("n").unwrap().col::<i64>("n").unwrap(), -1);
        assert_eq!(held.kept(), 1, "all finalized, the new one kept");
        drop(held);
        conn.close().await.unwrap();
    }
}
