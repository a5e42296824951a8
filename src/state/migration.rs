//! The one `migration` row: phase, copy runs, capture and follower progress, the last verify and
//! the last cutover record.

use tokio_postgres::{types::ToSql, GenericClient};

use super::{decode, CutoverRecord, Phase, State};
use crate::{
    error::{Error, Result},
    pg::Lsn,
};

/// A pending key's oldest change not yet on green: `first_lsn`, kept when the key is captured
/// again before it is applied (`lsn` is then the newest).
const OLDEST_PENDING: &str = "min(coalesce(first_lsn, lsn))";

/// What a follower's report read back.
#[derive(Debug, Clone, Copy, Default)]
pub struct FollowerReport {
    /// Blue's position as capture last saw it.
    pub blue: Option<Lsn>,
    /// The oldest position not yet on green (oldest pending key or capture's frontier), as
    /// counted now or given as the last count's.
    pub oldest: Option<Lsn>,
}

/// What cutover's preflight reads about the follower and the last verify.
#[derive(Debug, Clone)]
pub struct FollowerView {
    /// A follower wrote progress within the last few seconds.
    pub follower_active: bool,
    /// Every change before this blue position is stored on green.
    pub capture_lsn: Option<Lsn>,
    /// The oldest change of a pending key (its first not yet applied).
    pub oldest_pending: Option<Lsn>,
    /// Keys pending.
    pub pending: i64,
    /// The last verify found no difference.
    pub verify_equal: bool,
    /// When the last verify ran.
    pub verify_at: Option<String>,
    /// Verified buckets that were not clean.
    pub bad_buckets: i64,
    /// Entries with at least one verified bucket.
    pub verified: Vec<super::TableId>,
    /// Keys applied since the last verify.
    pub touched: i64,
}

/// What `status` shows from the migration row.
#[derive(Debug, Clone, Default)]
pub struct StatusView {
    /// Bytes of blue WAL not yet on green.
    pub lag_bytes: Option<i64>,
    /// Keys waiting.
    pub pending_keys: Option<i64>,
    /// Keys applied by the current follower.
    pub applied_keys: i64,
    /// Keys applied per second over the last few seconds.
    pub apply_rate: Option<f64>,
    /// How long ago blue was at the oldest change green does not have yet (about; sampled
    /// every second by the follower).
    pub lag_seconds: Option<f64>,
    /// Seconds since the follower last wrote progress.
    pub follower_seen_seconds_ago: Option<f64>,
    /// The last verify's summary, with `at`.
    pub last_verify: Option<serde_json::Value>,
    /// The last cutover's record.
    pub cutover: Option<CutoverRecord>,
    /// When `cleanup` removed the rest of a switched migration's state.
    pub cleaned_up_at: Option<String>,
    /// The last failed run since the last `copy` started: `command`, `error`, `at`.
    pub last_error: Option<serde_json::Value>,
}

impl State {
    /// Reads the phase; `None` when there is no state yet.
    pub async fn phase(&self, green: &impl GenericClient) -> Result<Option<Phase>> {
        let exists: bool = green
            .query_one("SELECT to_regclass($1) IS NOT NULL", &[&self.table("migration")])
            .await
            .map_err(Error::db("green: reading migration state"))?
            .get(0);
        if !exists {
            return Ok(None);
        }
        let row = green
            .query_opt(&format!("SELECT state FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading migration state"))?;
        row.map(|r| decode("the migration phase", r.get(0))).transpose()
    }

    /// Stores the phase, refusing a transition its story does not allow (see
    /// [`Phase::may_become`]): the check and the write are one statement.
    pub async fn set_phase(&self, green: &impl GenericClient, phase: &Phase) -> Result<()> {
        let value = serde_json::to_value(phase).map_err(|e| Error::StateDecode {
            what: "the migration phase".into(),
            value: format!("{phase:?}"),
            reason: e.to_string(),
        })?;
        let allowed: Vec<&str> = Phase::predecessors(phase).to_vec();
        let n = green
            .execute(
                &format!(
                    "UPDATE {} SET state = $1, updated_at = now() WHERE id = 1 AND state->>'phase' = ANY($2)",
                    self.table("migration")
                ),
                &[&value, &allowed],
            )
            .await
            .map_err(Error::db("green: saving migration phase"))?;
        if n == 0 {
            let from = self.phase(green).await?.map(|p| p.name()).unwrap_or("none");
            return Err(Error::PhaseTransition { from: from.to_string(), to: phase.name().to_string() });
        }
        Ok(())
    }

    /// The current copy run's number (a joined worker records it on its chunks).
    pub async fn epoch(&self, green: &impl GenericClient) -> Result<i32> {
        Ok(green
            .query_one(&format!("SELECT copy_epoch FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading the copy run"))?
            .get(0))
    }

    /// Starts a new copy run and returns its number, recorded on each chunk it copies. The run
    /// has no transaction floor until [`Self::set_copy_floor`].
    pub async fn next_epoch(&self, green: &impl GenericClient) -> Result<i32> {
        Ok(green
            .query_one(
                &format!(
                    "UPDATE {} SET copy_epoch = copy_epoch + 1, copy_xid_floor = NULL WHERE id = 1 RETURNING copy_epoch",
                    self.table("migration")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: starting a copy run"))?
            .get(0))
    }

    /// Records the current copy run's transaction floor (see `copy::snapshots`): joined workers
    /// leave out the same rows the leader does.
    pub async fn set_copy_floor(&self, green: &impl GenericClient, floor: i64) -> Result<()> {
        green
            .execute(&format!("UPDATE {} SET copy_xid_floor = $1 WHERE id = 1", self.table("migration")), &[&floor])
            .await
            .map_err(Error::db("green: recording the copy's transaction floor"))?;
        Ok(())
    }

    /// The current copy run's transaction floor, once its leader recorded it.
    pub async fn copy_floor(&self, green: &impl GenericClient) -> Result<Option<i64>> {
        Ok(green
            .query_one(&format!("SELECT copy_xid_floor FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading the copy's transaction floor"))?
            .get(0))
    }

    /// Stores the cutover record (step timeline, pause, sequences).
    pub async fn set_cutover(&self, green: &impl GenericClient, record: &CutoverRecord) -> Result<()> {
        let record = serde_json::to_value(record).map_err(|e| Error::StateDecode {
            what: "the cutover record".into(),
            value: format!("{record:?}"),
            reason: e.to_string(),
        })?;
        green
            .execute(
                &format!("UPDATE {} SET cutover = $1, updated_at = now() WHERE id = 1", self.table("migration")),
                &[&record],
            )
            .await
            .map_err(Error::db("green: saving the cutover record"))?;
        Ok(())
    }

    /// Stores how far capture has stored changes; in capture's own transaction, with the keys.
    /// Flushed at commit whatever the session's `synchronous_commit` (the cutover's apply
    /// session turns it off): blue forgets the changes once this returns, and the flush also
    /// makes every key stored before it durable.
    pub async fn set_capture_lsn(&self, green: &impl GenericClient, lsn: Lsn) -> Result<()> {
        green
            .batch_execute(&format!(
                "BEGIN; SET LOCAL synchronous_commit = on; UPDATE {} SET capture_lsn = {} WHERE id = 1; COMMIT;",
                self.table("migration"),
                lsn.0
            ))
            .await
            .map_err(Error::db("green: saving the capture position"))?;
        Ok(())
    }

    /// Stores blue's current position and capture's frontier, for lag.
    pub async fn record_positions(&self, green: &impl GenericClient, blue_lsn: Lsn, capture_lsn: Lsn) -> Result<()> {
        green
            .execute(
                &format!("UPDATE {} SET blue_lsn = $1, capture_lsn = $2 WHERE id = 1", self.table("migration")),
                &[&blue_lsn, &capture_lsn],
            )
            .await
            .map_err(Error::db("green: saving the capture position"))?;
        Ok(())
    }

    /// Writes lag, pending count and apply rate, and marks the follower alive. Lag: blue's
    /// position minus the oldest position not yet on green (the oldest pending key, or
    /// capture's frontier). Counting reads all of pending (a quarter of a second at 3M keys);
    /// without `count` the stored count stays and `last_oldest` (the oldest position the last
    /// count found) stands for the oldest pending key. Keys capture stored since lie beyond its
    /// frontier at that count (for them the lag is only overstated); keys a copy stores for
    /// rows it left out carry the copy's older position and show at the next count.
    pub async fn report_follower(
        &self,
        green: &impl GenericClient,
        applied: i64,
        rate: f64,
        count: bool,
        last_oldest: Option<Lsn>,
    ) -> Result<FollowerReport> {
        let p = self.table("pending");
        let (pending, params): (String, Vec<&(dyn ToSql + Sync)>) = if count {
            (format!("SELECT count(*) AS n, {OLDEST_PENDING} AS oldest FROM {p}"), vec![&applied, &rate])
        } else {
            ("SELECT NULL::int8 AS n, $3::int8 AS oldest".into(), vec![&applied, &rate, &last_oldest])
        };
        let r = green
            .query_opt(
                &format!(
                    "UPDATE {m} SET pending_keys = coalesce(p.n, pending_keys), \
                        lag_bytes = greatest(0, blue_lsn - least(coalesce(p.oldest, capture_lsn), capture_lsn)), \
                        applied_keys = $1, apply_rate = $2, follower_seen_at = now() \
                     FROM ({pending}) p WHERE id = 1 \
                     RETURNING blue_lsn, least(coalesce(p.oldest, capture_lsn), capture_lsn)",
                    m = self.table("migration"),
                ),
                &params,
            )
            .await
            .map_err(Error::db("green: saving follower progress"))?;
        Ok(r.map(|r| FollowerReport { blue: r.get(0), oldest: r.get(1) }).unwrap_or_default())
    }

    /// Writes how long ago blue was at the oldest position not yet on green.
    pub async fn report_lag_seconds(&self, green: &impl GenericClient, seconds: Option<f64>) -> Result<()> {
        green
            .execute(&format!("UPDATE {} SET lag_seconds = $1 WHERE id = 1", self.table("migration")), &[&seconds])
            .await
            .map_err(Error::db("green: saving follower progress"))?;
        Ok(())
    }

    /// Whether a follower wrote its progress within `window`.
    pub async fn follower_seen_within(&self, green: &impl GenericClient, window: std::time::Duration) -> Result<bool> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT coalesce(follower_seen_at > now() - make_interval(secs => $1), false) FROM {} WHERE id = 1",
                    self.table("migration")
                ),
                &[&window.as_secs_f64()],
            )
            .await
            .map_err(Error::db("green: reading follower progress"))?
            .get(0))
    }

    /// How far capture has stored changes (it moves on every capture round while blue writes).
    pub async fn capture_position(&self, green: &impl GenericClient) -> Result<Option<Lsn>> {
        Ok(green
            .query_one(&format!("SELECT capture_lsn FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading the capture position"))?
            .get(0))
    }

    /// Records that a verify has started (once, before it reads any position). Until then no
    /// key needs recording as touched: the first clean verify covers every change before its
    /// position, and a key applied before any verify began changed before that position.
    pub async fn mark_verify_started(&self, green: &impl GenericClient) -> Result<()> {
        green
            .execute(
                &format!(
                    "UPDATE {} SET verify_started_at = coalesce(verify_started_at, now()) WHERE id = 1",
                    self.table("migration")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: recording that verify started"))?;
        Ok(())
    }

    /// Whether a verify has ever started; see [`Self::mark_verify_started`]. A verify that
    /// finished or recorded buckets counts too (one run by a version that did not mark its start).
    pub async fn verify_started(&self, green: &impl GenericClient) -> Result<bool> {
        Ok(green
            .query_one(
                &format!(
                    "SELECT verify_started_at IS NOT NULL OR last_verify_at IS NOT NULL \
                            OR EXISTS (SELECT 1 FROM {}) FROM {} WHERE id = 1",
                    self.table("verified"),
                    self.table("migration")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading whether verify started"))?
            .get(0))
    }

    /// Records that a run of `command` failed with `error` (no password: errors show
    /// connection strings redacted); `status` shows it until the next `copy` starts.
    pub async fn record_failure(&self, green: &impl GenericClient, command: &str, error: &str) -> Result<()> {
        green
            .execute(
                &format!(
                    "UPDATE {} SET last_error = jsonb_build_object('command', $1::text, 'error', $2::text, \
                       'at', now()::text) WHERE id = 1",
                    self.table("migration")
                ),
                &[&command, &error],
            )
            .await
            .map_err(Error::db("green: recording a failed run"))?;
        Ok(())
    }

    /// Forgets the last failure (a new `copy` runs).
    pub async fn clear_failure(&self, green: &impl GenericClient) -> Result<()> {
        green
            .execute(&format!("UPDATE {} SET last_error = NULL WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: clearing the last failure"))?;
        Ok(())
    }

    /// Stores the last verify's summary.
    pub async fn set_last_verify(&self, green: &impl GenericClient, summary: &serde_json::Value) -> Result<()> {
        green
            .execute(
                &format!(
                    "UPDATE {} SET last_verify = $1, last_verify_at = now() WHERE id = 1",
                    self.table("migration")
                ),
                &[summary],
            )
            .await
            .map_err(Error::db("green: recording the verify result"))?;
        Ok(())
    }

    /// The follower and last-verify facts cutover's preflight checks.
    pub async fn follower_view(&self, green: &impl GenericClient) -> Result<FollowerView> {
        let row = green
            .query_one(
                &format!(
                    "SELECT coalesce(follower_seen_at > now() - interval '5 seconds', false), capture_lsn, \
                            coalesce((last_verify->>'equal')::boolean, false), last_verify_at::text, \
                            p.oldest, p.n, \
                            (SELECT count(*) FROM {v} WHERE NOT ok), \
                            ARRAY(SELECT DISTINCT tbl FROM {v}), \
                            (SELECT count(*) FROM (SELECT tbl, key FROM {t} UNION SELECT tbl, key FROM {l}) k) \
                     FROM {m}, (SELECT {OLDEST_PENDING} AS oldest, count(*) AS n FROM {p}) p WHERE id = 1",
                    m = self.table("migration"),
                    p = self.table("pending"),
                    v = self.table("verified"),
                    t = self.table("touched"),
                    l = self.table("touched_log"),
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading the migration state"))?;
        Ok(FollowerView {
            follower_active: row.get(0),
            capture_lsn: row.get(1),
            verify_equal: row.get(2),
            verify_at: row.get(3),
            oldest_pending: row.get(4),
            pending: row.get(5),
            bad_buckets: row.get(6),
            verified: row.get::<_, Vec<String>>(7).into_iter().map(super::TableId::from_stored).collect(),
            touched: row.get(8),
        })
    }

    /// The migration row as `status` shows it.
    pub async fn status_view(&self, green: &impl GenericClient) -> Result<StatusView> {
        let r = green
            .query_one(
                &format!(
                    "SELECT lag_bytes, pending_keys, applied_keys, apply_rate, \
                            extract(epoch FROM now() - follower_seen_at)::float8, \
                            last_verify || jsonb_build_object('at', last_verify_at), cutover, \
                            (to_jsonb(m) ->> 'cleaned_up_at'), (to_jsonb(m) ->> 'lag_seconds')::float8, to_jsonb(m) -> 'last_error' \
                     FROM {} m WHERE id = 1",
                    self.table("migration")
                ),
                &[],
            )
            .await
            .map_err(Error::db("green: reading capture progress"))?;
        Ok(StatusView {
            lag_bytes: r.get(0),
            pending_keys: r.get(1),
            applied_keys: r.get(2),
            apply_rate: r.get(3),
            follower_seen_seconds_ago: r.get(4),
            last_verify: r.get(5),
            cutover: r.get::<_, Option<serde_json::Value>>(6).map(|v| decode("the cutover record", v)).transpose()?,
            cleaned_up_at: r.get(7),
            lag_seconds: r.get(8),
            last_error: r.get::<_, Option<serde_json::Value>>(9).filter(|v| !v.is_null()),
        })
    }
}

impl State {
    /// The live control `migrate control` set (all off when none).
    pub async fn control(&self, green: &impl GenericClient) -> Result<Control> {
        let v: Option<serde_json::Value> = green
            .query_one(&format!("SELECT control FROM {} WHERE id = 1", self.table("migration")), &[])
            .await
            .map_err(Error::db("green: reading the live control"))?
            .get(0);
        Ok(v.and_then(|v| serde_json::from_value(v).ok()).unwrap_or_default())
    }

    /// Merges `patch` (some of [`Control`]'s fields) into the stored control in one statement,
    /// so that two `migrate control` runs at once each keep the other's change; returns what is
    /// now set. Running processes pick it up within a second.
    pub async fn update_control(&self, green: &impl GenericClient, patch: &serde_json::Value) -> Result<Control> {
        let v: serde_json::Value = green
            .query_one(
                &format!(
                    "UPDATE {} SET control = coalesce(control, '{{}}'::jsonb) || $1 WHERE id = 1 RETURNING control",
                    self.table("migration")
                ),
                &[patch],
            )
            .await
            .map_err(Error::db("green: storing the live control"))?
            .get(0);
        Ok(serde_json::from_value(v).unwrap_or_default())
    }
}

/// What `migrate control` sets.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Control {
    /// Copy workers and the follower wait.
    #[serde(default)]
    pub paused: bool,
    /// Copy rate in rows per second in place of the plan's `max_rows_per_second` (0: the plan's).
    #[serde(default)]
    pub rows_per_second: u64,
    /// `cutover` waits before it starts until this is cleared.
    #[serde(default)]
    pub postponed: bool,
}
