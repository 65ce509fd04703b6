//! The resource table (seed fig. 5).

use patchover_core::LcSpec;
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::{Store, StoreError, now_ms, q};

/// The `meta` key holding the LC section (JSON) the resource table was last synced from.
const SYNCED_LCS: &str = "synced_lcs";

/// What an LC is doing for the service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Runs the service.
    Active,
    /// Holds a patched copy, or is the old LC kept as a rollback target.
    Standby,
    Unused,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Active => "active",
            Role::Standby => "standby",
            Role::Unused => "unused",
        }
    }
    fn parse(s: &str) -> Role {
        match s {
            "active" => Role::Active,
            "standby" => Role::Standby,
            _ => Role::Unused,
        }
    }
}

/// One row of the resource table.
#[derive(Debug, Clone, Serialize)]
pub struct LcRow {
    pub spec: LcSpec,
    pub role: Role,
}

impl Store {
    /// Makes the resource table mirror the config's LCs: new ones are added (unused), changed
    /// ones updated (role kept), removed ones deleted. Returns whether it wrote: the LC section
    /// the table was last synced from is kept in `meta`, and the same section again is only
    /// read, without taking the write lock (every CLI call and API request syncs, and would
    /// otherwise wait for any writer, such as a run journaling its steps).
    pub fn sync_lcs(&mut self, lcs: &[LcSpec]) -> Result<bool, StoreError> {
        let section = serde_json::to_string(lcs).expect("LcSpec serializes");
        if self.meta(SYNCED_LCS)?.as_deref() == Some(section.as_str()) {
            return Ok(false);
        }
        // IMMEDIATE: a deferred transaction that reads first cannot wait for another writer (SQLite
        // answers SQLITE_BUSY at once when it upgrades); this one takes the write lock up front and
        // waits with the busy timeout.
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
            .map_err(q("begin sync"))?;
        {
            let mut ids = Vec::new();
            let mut up = tx
                .prepare(
                    "INSERT INTO lcs (id, backend, cpu, cpu_share, memory_mib, system_disk, app_disk, app_mount, nics, spec, updated_ms)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
                     ON CONFLICT(id) DO UPDATE SET backend=excluded.backend, cpu=excluded.cpu,
                       cpu_share=excluded.cpu_share, memory_mib=excluded.memory_mib,
                       system_disk=excluded.system_disk, app_disk=excluded.app_disk,
                       app_mount=excluded.app_mount, nics=excluded.nics, spec=excluded.spec,
                       updated_ms=excluded.updated_ms
                     WHERE lcs.spec IS NOT excluded.spec",
                )
                .map_err(q("prepare sync"))?;
            for lc in lcs {
                let nics: Vec<String> = lc
                    .nics
                    .iter()
                    .map(|n| match n.address {
                        Some(a) => format!("{} {} {a}", n.name, n.mac),
                        None => format!("{} {}", n.name, n.mac),
                    })
                    .collect();
                let spec = serde_json::to_string(lc).expect("LcSpec serializes");
                up.execute(params![
                    lc.id.as_str(),
                    lc.backend.to_string(),
                    lc.cpu.cpu,
                    lc.cpu.share_pct,
                    lc.memory_mib as i64,
                    lc.system_disk.path.to_string_lossy(),
                    lc.app_disk
                        .as_ref()
                        .map(|d| d.path.to_string_lossy().into_owned()),
                    lc.app_disk
                        .as_ref()
                        .map(|d| d.mount.to_string_lossy().into_owned()),
                    nics.join(", "),
                    spec,
                    now_ms(),
                ])
                .map_err(q("sync LC"))?;
                ids.push(lc.id.to_string());
            }
            let existing: Vec<String> = tx
                .prepare("SELECT id FROM lcs")
                .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
                .map_err(q("list LCs"))?;
            for id in existing.iter().filter(|id| !ids.contains(id)) {
                tx.execute("DELETE FROM lcs WHERE id = ?1", [id])
                    .map_err(q("drop LC"))?;
            }
            tx.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                params![SYNCED_LCS, section],
            )
            .map_err(q("remember the synced LCs"))?;
        }
        tx.commit().map_err(q("commit sync"))?;
        Ok(true)
    }

    fn meta(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(q("read meta"))
    }

    pub fn lcs(&self) -> Result<Vec<LcRow>, StoreError> {
        let mut s = self
            .conn
            .prepare("SELECT spec, role FROM lcs ORDER BY id")
            .map_err(q("list LCs"))?;
        let rows = s
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(q("list LCs"))?;
        rows.map(|r| {
            let (spec, role) = r.map_err(q("read LC"))?;
            Ok(LcRow {
                spec: serde_json::from_str(&spec)
                    .map_err(|e| StoreError::NotFound(format!("corrupt LC row: {e}")))?,
                role: Role::parse(&role),
            })
        })
        .collect()
    }

    pub fn lc(&self, id: &str) -> Result<Option<LcRow>, StoreError> {
        let row = self
            .conn
            .query_row("SELECT spec, role FROM lcs WHERE id = ?1", [id], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })
            .optional()
            .map_err(q("read LC"))?;
        row.map(|(spec, role)| {
            Ok(LcRow {
                spec: serde_json::from_str(&spec)
                    .map_err(|e| StoreError::NotFound(format!("corrupt LC row: {e}")))?,
                role: Role::parse(&role),
            })
        })
        .transpose()
    }

    pub fn set_role(&mut self, id: &str, role: Role) -> Result<(), StoreError> {
        let n = self
            .conn
            .execute(
                "UPDATE lcs SET role = ?2, updated_ms = ?3 WHERE id = ?1",
                params![id, role.as_str(), now_ms()],
            )
            .map_err(q("set role"))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!(
                "no LC {id:?} in the resource table"
            )));
        }
        Ok(())
    }
}
